"""The arithmetic of a ViT's cost, without torch.

The sweep driver prints every trial's FLOPs in its plan; importing torch and timm for
that would add seconds to every launch, so the formulas live here, apart from the model.
"""

from __future__ import annotations

from trainers.config import ModelConfig


def forward_macs_per_image(cfg: ModelConfig, num_classes: int) -> int:
    """Multiply-accumulates of one forward pass, counting registers in the token count.

    Per block with T tokens of width D and MLP ratio r: QKV and output projections
    4*T*D^2, MLP 2*r*T*D^2, attention scores and weighted sum 2*T^2*D. Patch embedding
    and the head are added; norms, softmax and GELU are ignored (under 1%).
    """
    dim, depth, _ = cfg.dims
    tokens = cfg.num_patches + 1 + cfg.num_registers
    per_block = (4 + 2 * cfg.mlp_ratio) * tokens * dim * dim + 2 * tokens * tokens * dim
    patch_embed = cfg.num_patches * 3 * cfg.patch_size**2 * dim
    head = dim * num_classes
    return int(depth * per_block + patch_embed + head)


def train_flops_per_image(cfg: ModelConfig, num_classes: int) -> int:
    """Training FLOPs per image: forward 2 FLOPs per MAC, backward twice the forward."""
    return 6 * forward_macs_per_image(cfg, num_classes)
