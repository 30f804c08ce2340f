"""ViT with registers, built from timm (its cost arithmetic is in trainers/cost.py).

Registers are placed as the paper places them (Darcet et al. 2023, Sec. 3): N learnable
tokens after [CLS] and before the patches, with no position embedding, dropped at the
output. timm does exactly this with `reg_tokens=N, no_embed_class=True`; with
`no_embed_class=False` it would add position embeddings to [CLS] and the registers.

`model.register_depth` k > 0 moves the registers' entry from the input to just before block k
(trainers/late_registers.py); k = 0 builds timm's model unchanged.
"""

from __future__ import annotations

import torch
from timm.layers import DropPath
from timm.models import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer

from trainers.config import ModelConfig
from trainers.late_registers import LateRegisterViT, prefix_tokens_at, register_depth  # noqa: F401 (re-exported)


def build_model(cfg: ModelConfig, num_classes: int, *, dynamic_img_size: bool = False) -> VisionTransformer:
    """num_classes=0 gives a backbone whose forward returns the normed [CLS] feature.

    dynamic_img_size: accept other input sizes, with the patch position embeddings
    interpolated to the input's grid (DINO's local crops)."""
    dim, depth, heads = cfg.dims
    # Depth 0 is timm's own class, so today's models stay exactly what they were. The subclass
    # runs timm's constructor unchanged (same parameters, same initialisation, same RNG draws).
    late = {"register_depth": cfg.register_depth} if cfg.register_depth else {}
    model = (LateRegisterViT if late else VisionTransformer)(
        **late,
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        num_classes=num_classes,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        mlp_ratio=cfg.mlp_ratio,
        class_token=True,
        reg_tokens=cfg.num_registers,
        no_embed_class=True,  # position embeddings for patches only, never for [CLS] or registers
        global_pool="token",  # classify from [CLS]; registers are dropped at the output
        drop_path_rate=cfg.drop_path_rate,
        dynamic_img_size=dynamic_img_size,
        init_values=cfg.layer_scale,  # LayerScale (ls1, ls2 per block) when set; timm leaves it out for None
        # Linear layers only; position embedding, [CLS] and registers are initialised alike in both modes.
        weight_init="" if cfg.weight_init == "timm" else cfg.weight_init,
    )
    if cfg.drop_path_mode == "uniform" and cfg.drop_path_rate > 0:
        # timm spreads drop_path_rate linearly over depth (0 in the first block); DeiT-III's
        # models_v2.py gives every block the same rate.
        for block in model.blocks:
            block.drop_path1 = DropPath(cfg.drop_path_rate)
            block.drop_path2 = DropPath(cfg.drop_path_rate)
    return model


def run_blocks(vit: VisionTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """The ViT's blocks on a token sequence. Objectives that build their own forward (DINO's
    masked student, CLIP's image tower) run the blocks through here, so that
    `train.grad_checkpointing` (vit.grad_checkpointing, set by timm's set_grad_checkpointing)
    acts for them as it does in timm's own forward: each block's activations are recomputed in
    the backward pass instead of kept. Non-reentrant checkpointing, as timm's default: it works
    under DDP and with inputs that need no gradient."""
    if vit.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
        return checkpoint_seq(vit.blocks, tokens, use_reentrant=False)
    return vit.blocks(tokens)


def forward_features(vit: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """timm's forward_features (normed output tokens [B, prefix + patches, D]) with the blocks run by run_blocks."""
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
    return vit.norm(run_blocks(vit, x))


def drop_path_rates(model: VisionTransformer) -> list[float]:
    """The stochastic-depth rate of each block (0 where it has none)."""
    return [float(getattr(block.drop_path1, "drop_prob", 0.0)) for block in model.blocks]


def patch_tokens(tokens: torch.Tensor, model: VisionTransformer, block: int | None = None) -> torch.Tensor:
    """Patch tokens of an NLC token tensor at the output, or at `block`. The prefix is [CLS] +
    registers: never slice a literal 1."""
    prefix = model.num_prefix_tokens if block is None else prefix_tokens_at(model, block)
    return tokens[:, prefix:]


def register_tokens(tokens: torch.Tensor, model: VisionTransformer, block: int | None = None) -> torch.Tensor:
    """Register tokens of an NLC token tensor at the output, or at `block` (empty along dim 1 when there are none)."""
    start = 1 if model.cls_token is not None else 0
    prefix = model.num_prefix_tokens if block is None else prefix_tokens_at(model, block)
    return tokens[:, start:prefix]
