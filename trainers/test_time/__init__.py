"""Test-time registers (Jiang, Dravid, Efros, Gandelsman, "Vision Transformers Don't Need
Trained Registers", arXiv 2506.08010): move a ViT's high-norm artifacts out of the image
into one extra token, without training. Pure PyTorch on timm's VisionTransformer.

1. `find_register_neurons` (search.py): mark outlier patches by their norm at one block's
   output; score every MLP hidden unit (the input of `mlp.fc2`, i.e. after the activation)
   by its mean |activation| on those patches, per image, averaged over the images that have
   outliers; optionally keep only sparse units (activation below 0.5 on at least half of
   the image's tokens, as the authors' notebook does); keep the top-k over blocks 0..max_layer.
2. `test_time_register(model, neurons)` (intervention.py): one zero token is added to the
   prefix, and in each chosen unit the value of largest magnitude over the patches (the
   maximum, for units that fire positively) is written into that token while the patches
   get zero. Inside the context the model reports one more register, so the probes measure
   it like a trained one.

Differences from the authors' code (nickjiang2378/test-time-registers), all deliberate:
outliers are looked for among the patch tokens only (theirs: the whole sequence, [CLS]
included); the value moved into the register is taken per image and per unit over the
patches (theirs: one value per layer, the signed maximum over all tokens and all of the
layer's units, of the first image); the token sits at the end of the prefix (theirs: at the
end of the sequence). A ViT with absolute position embeddings is permutation-equivariant
after the embedding, so the token's place changes nothing but the slicing; at the end of
the prefix timm's `num_prefix_tokens` keeps pooling and `forward_intermediates` right.
"""

from __future__ import annotations

from trainers.test_time.intervention import neurons_from, test_time_register
from trainers.test_time.search import (
    FAMILY_DEFAULTS,
    NeuronSearch,
    RegisterNeuron,
    TestTimeRegisterConfig,
    default_config,
    find_register_neurons,
    generic_max_layer,
)

__all__ = [
    "FAMILY_DEFAULTS",
    "NeuronSearch",
    "RegisterNeuron",
    "TestTimeRegisterConfig",
    "default_config",
    "find_register_neurons",
    "generic_max_layer",
    "neurons_from",
    "test_time_register",
]
