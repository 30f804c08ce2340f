"""One instrumented forward pass: everything the probes read, captured in fp32.

The probes need four views of the same forward pass: the patch-embedding output (the
"input embedding" of paper Fig. 5a), the raw residual stream after every block (Fig. 3/4),
the normed output features (what a downstream linear head sees) and the last block's
fused qkv projection (to recompute attention maps that SDPA never materialises).

With late registers (`model.register_depth` k > 0) the blocks before k hold no registers: each
block's tokens are kept as they are, with the block's own prefix count beside them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from timm.models.vision_transformer import VisionTransformer

from trainers.late_registers import prefix_tokens_at


@dataclass
class Capture:
    block_tokens: list[torch.Tensor]  # per block: raw residual stream [B, N_i, D], prefix first then patches
    features: torch.Tensor  # [B, N, D] last block output after the final norm
    patch_embed: torch.Tensor  # [B, P, D] patch-embedding output, before position embedding and blocks
    qkv: torch.Tensor  # [B, N, 3 * attn_dim] output of the last block's attn.qkv
    grid: tuple[int, int]  # patch grid (h, w); P = h * w
    num_prefix: int  # [CLS] + registers at the output
    num_registers: int
    has_cls: bool  # registers start at index 1 with a [CLS] token, else at 0
    block_prefix: list[int] = field(default_factory=list)  # [CLS] + registers at each block (fewer before register_depth)

    @property
    def register_slice(self) -> slice:
        return slice(int(self.has_cls), self.num_prefix)

    def prefix_at(self, block: int) -> int:
        return self.block_prefix[block] if self.block_prefix else self.num_prefix

    def registers_at(self, block: int) -> int:
        """Registers present in the residual stream at `block`: 0 before the registers enter."""
        return self.prefix_at(block) - int(self.has_cls)


def unwrap(model: torch.nn.Module) -> VisionTransformer:
    """The timm model behind a torch.compile wrapper (probes must not trigger recompiles)."""
    inner = getattr(model, "_orig_mod", model)
    if not isinstance(inner, VisionTransformer):
        raise TypeError(f"probes need a timm VisionTransformer, got {type(inner).__name__}")
    return inner


def capture(model: VisionTransformer, images: torch.Tensor) -> Capture:
    """Run `model` once on `images` (caller sets eval/no_grad/autocast) and keep what the probes read."""
    grabbed: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(_module: torch.nn.Module, _inputs: object, output: torch.Tensor) -> None:
            grabbed[name] = output.detach()

        return hook

    handles = [
        model.patch_embed.register_forward_hook(keep("patch_embed")),
        model.blocks[-1].attn.qkv.register_forward_hook(keep("qkv")),
    ]
    try:
        features, intermediates = model.forward_intermediates(
            images, return_prefix_tokens=True, norm=False, output_fmt="NLC"
        )
    finally:
        for handle in handles:
            handle.remove()

    # With prefix tokens timm returns (patches [B,P,D], prefix [B,np,D]) per block; without, bare tensors.
    block_tokens = [
        torch.cat([item[1], item[0]], dim=1) if isinstance(item, tuple) else item for item in intermediates
    ]
    batch, _, height, width = images.shape
    embed = grabbed["patch_embed"]
    # From the prefix count, not reg_token: a test-time register (trainers/test_time) has no parameter.
    num_registers = int(model.num_prefix_tokens) - int(model.cls_token is not None)
    return Capture(
        block_tokens=[t.float() for t in block_tokens],
        features=features.float(),
        patch_embed=embed.reshape(batch, -1, embed.shape[-1]).float(),  # NHWC when dynamic_img_size
        qkv=grabbed["qkv"].float(),
        grid=tuple(model.patch_embed.dynamic_feat_size((height, width))),  # type: ignore[arg-type]
        num_prefix=int(model.num_prefix_tokens),
        num_registers=num_registers,
        has_cls=model.cls_token is not None,
        block_prefix=[prefix_tokens_at(model, i) for i in range(len(block_tokens))],
    )
