"""The recipes of the self-supervised objectives: DINOv2-style self-distillation and CLIP.

Blocks of trainers.config.TrainConfig (`train.dino`, `train.clip`), kept apart from the rest
of the config because they are long and only their objective reads them.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from trainers.strict import Strict


class DinoConfig(Strict):
    """DINOv2 recipe (Oquab et al. 2023; facebookresearch/dinov2 ssl_default_config.yaml).

    Schedules are given as fractions of training so that a grid over `steps` keeps their shape.
    The global crops have model.img_size; the base weight decay is optim.weight_decay (DINOv2: 0.04).
    """

    head_prototypes: int = Field(default=65536, gt=0, description="K, the DINO head's output dimension")
    head_hidden_dim: int = Field(default=2048, gt=0)
    head_bottleneck_dim: int = Field(default=256, gt=0)
    local_crops: int = Field(default=8, ge=0, description="local crops per image (2 global crops always)")
    local_crop_size: int = Field(default=96, gt=0, description="pixels; a multiple of model.patch_size")
    global_crop_scale: tuple[float, float] = (0.32, 1.0)
    local_crop_scale: tuple[float, float] = (0.05, 0.32)
    colour_jitter: float = Field(
        default=0.4, ge=0, description="contrast and per-channel shift, in units of the normalised pixel scale"
    )
    centering: Literal["sinkhorn_knopp", "momentum"] = "sinkhorn_knopp"
    center_momentum: float = Field(default=0.9, ge=0, lt=1, description="momentum centring only")
    student_temp: float = Field(default=0.1, gt=0)
    teacher_temp: float = Field(default=0.07, gt=0, description="after the warmup")
    warmup_teacher_temp: float = Field(default=0.04, gt=0)
    teacher_temp_warmup: float = Field(default=0.3, ge=0, le=1, description="fraction of training (DINOv2: 30 of 100 epochs)")
    momentum_teacher: float = Field(default=0.992, ge=0, le=1, description="EMA momentum at step 0; cosine to final_momentum_teacher")
    final_momentum_teacher: float = Field(default=1.0, ge=0, le=1)
    weight_decay_end: float = Field(default=0.2, ge=0, description="cosine from optim.weight_decay to this")
    freeze_last_layer: float = Field(default=0.01, ge=0, le=1, description="fraction of training with the prototypes frozen")
    ibot_weight: float = Field(default=1.0, ge=0, description="0 turns the iBOT masked-patch loss off")
    ibot_mask_ratio: tuple[float, float] = (0.1, 0.5)
    ibot_mask_probability: float = Field(default=0.5, ge=0, le=1, description="share of global crops that get a mask")
    ibot_separate_head: bool = False
    koleo_weight: float = Field(default=0.1, ge=0)
    knn_k: int = Field(default=20, gt=0, description="k-NN eval: neighbours (DINO: 20)")
    knn_temperature: float = Field(default=0.07, gt=0)
    knn_train_size: int = Field(default=10000, gt=0, description="k-NN eval: training images in the feature bank")

    def mask_slots(self, rows: int, global_batch: int, num_patches: int) -> int:
        """iBOT's slots for the masked patches of `rows` global crops (DinoObjective.mask_slots;
        torch-free, so that trainers/memory.py counts the same slots): at most the masked crops of
        the global batch, int(2 * global_batch * probability), each with at most the top ratio of
        its patches (+1 for the float rounding of the ratio)."""
        masked_crops = min(rows, int(2 * global_batch * self.ibot_mask_probability))
        return masked_crops * (math.floor(self.ibot_mask_ratio[1] * num_patches) + 1)

    @model_validator(mode="after")
    def _check_ranges(self) -> "DinoConfig":
        for key in ("global_crop_scale", "local_crop_scale", "ibot_mask_ratio"):
            low, high = getattr(self, key)
            if not 0 < low <= high <= 1:
                raise ValueError(f"{key} must be (low, high) with 0 < low <= high <= 1; got ({low}, {high})")
        return self


class ClipConfig(Strict):
    """CLIP recipe (Radford et al. 2021; open_clip's defaults). The image tower is the model block."""

    embed_dim: int = Field(default=512, gt=0, description="joint image-text embedding width")
    text_width: int = Field(default=512, gt=0)
    text_layers: int = Field(default=12, gt=0)
    text_heads: int = Field(default=8, gt=0)
    context_length: int = Field(default=77, gt=2, description="text tokens, start and end included")
    init_temperature: float = Field(default=0.07, gt=0, description="learned; logit scale = 1 / temperature")
    max_logit_scale: float = Field(default=100.0, gt=1, description="open_clip clamps the logit scale here")
    prompts: list[str] = Field(
        default=["a photo of a {}.", "a drawing of a {}.", "a {} on a background."],
        min_length=1,
        description="zero-shot templates; '{}' is the class name",
    )

    @model_validator(mode="after")
    def _check_text(self) -> "ClipConfig":
        if self.text_width % self.text_heads:
            raise ValueError(f"text_width {self.text_width} is not divisible by text_heads {self.text_heads}")
        bad = [p for p in self.prompts if "{}" not in p]
        if bad:
            raise ValueError(f"prompt {bad[0]!r} has no '{{}}' for the class name")
        return self
