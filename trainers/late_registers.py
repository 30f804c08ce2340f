"""Registers that enter the sequence before block k instead of at the input (`model.register_depth`).

The paper closes on where registers should sit. In the *sequence* their place does not matter:
they carry no position embedding and attention is permutation-equivariant, so any order of the
tokens after the embedding computes the same thing (tests/test_register_depth.py checks it). In
*depth* it might: artifacts form in the middle blocks, so do registers need to exist from the
input, or is it enough to add them just before the block where artifacts would form?

`LateRegisterViT` is timm's VisionTransformer with one change of place. Its constructor is timm's
(registers as `reg_token`, initialised as timm initialises them, normal with std 1e-6, under the
same state_dict key as at depth 0), but `_pos_embed` leaves the registers out and a forward
pre-hook on block k inserts them right after [CLS]. After block k the sequence is laid out as
timm's ([CLS], registers, patches), and `num_prefix_tokens` counts the registers, as pooling and
everything that reads the output need. Because the insertion belongs to block k itself, every
code path that runs `model.blocks` gets it without code of its own: timm's forward_features,
forward_intermediates, `checkpoint_seq` for gradient checkpointing (the hook runs again in the
recomputation), DINO's encode, CLIP's image tower, DDP and torch.compile (dynamo traces module
hooks registered before compiling). Block indices stay those of the model, so per-block probes
keep their meaning. A bound method is the hook so that `copy.deepcopy` and pickling carry it
over to the copy's own `reg_token`. The state_dict keys are depth 0's, so a state dict loads
at any depth: the depth is the config's (checkpoints carry it; inspection builds from it).

Blocks before k see only [CLS] as prefix: `prefix_tokens_at(model, block)` gives
the count per block, and `forward_intermediates` is overridden to split each block's tokens there.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import resample_abs_pos_embed
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import VisionTransformer


def register_depth(model: VisionTransformer) -> int:
    """The block before which the registers enter (0: at the input, as in timm and the paper)."""
    return int(getattr(model, "register_depth", 0))


def prefix_tokens_at(model: VisionTransformer, block: int) -> int:
    """[CLS] + registers in the residual stream at block `block` (its input and its output).

    `model.num_prefix_tokens` counts them at the output; with late registers the blocks before
    `register_depth` see only [CLS] (and any test-time register, which enters at the input).
    Any timm ViT works: one without the attributes has its registers from the input."""
    late = int(getattr(model, "num_late_registers", 0))
    return int(model.num_prefix_tokens) - (late if block < register_depth(model) else 0)


class LateRegisterViT(VisionTransformer):
    def __init__(self, *, register_depth: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not self.num_reg_tokens:
            raise ValueError("register_depth needs registers (reg_tokens > 0)")
        if not 0 < register_depth < len(self.blocks):
            raise ValueError(f"register_depth {register_depth} is no block of a {len(self.blocks)}-block model after the first")
        if not self.no_embed_class:
            raise ValueError("late registers carry no position embedding: build with no_embed_class=True")
        self.register_depth = register_depth
        # Registers inserted at block k; num_reg_tokens may grow by a test-time register, which enters at the input.
        self.num_late_registers = self.num_reg_tokens
        self.blocks[register_depth].register_forward_pre_hook(self._insert_registers)

    def _insert_registers(self, _block: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        """Block k's input gets the registers right after [CLS], where timm puts them at the input."""
        x = args[0]
        at = 1 if self.cls_token is not None else 0
        registers = self.reg_token.expand(x.shape[0], -1, -1).to(x.dtype)
        return (torch.cat([x[:, :at], registers, x[:, at:]], dim=1), *args[1:])

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """timm's `_pos_embed` with no_embed_class, without the registers: patches + position, then [CLS]."""
        if self.dynamic_img_size:
            batch, height, width, channels = x.shape
            pos_embed = resample_abs_pos_embed(
                self.pos_embed, new_size=(height, width), old_size=self.patch_embed.grid_size, num_prefix_tokens=0
            )
            x = x.view(batch, -1, channels)
        else:
            pos_embed = self.pos_embed
        if pos_embed is not None:
            x = x + pos_embed
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x)

    def forward_intermediates(  # type: ignore[override]
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> Any:
        """timm's forward_intermediates, each block's tokens split at that block's prefix count.

        timm splits every intermediate at `num_prefix_tokens`, which before block k would cut
        registers' worth of patches off; here timm's NLC tensors are joined again and split per block."""
        assert output_fmt in ("NCHW", "NLC"), "Output format must be one of NCHW or NLC."
        take_indices, _ = feature_take_indices(len(self.blocks), indices)
        result = super().forward_intermediates(
            x, indices, return_prefix_tokens=True, norm=norm, stop_early=stop_early, output_fmt="NLC",
            intermediates_only=intermediates_only, attn_mask=attn_mask, is_causal=is_causal,
        )
        final, pairs = (None, result) if intermediates_only else result
        batch, _, height, width = x.shape
        grid = self.patch_embed.dynamic_feat_size((height, width))
        patches, prefixes = [], []
        for block, (patch, prefix) in zip(sorted(take_indices), pairs):
            tokens = torch.cat([prefix, patch], dim=1)
            split = prefix_tokens_at(self, block)
            body = tokens[:, split:]
            if output_fmt == "NCHW":
                body = body.reshape(batch, grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous()
            patches.append(body)
            prefixes.append(tokens[:, :split])
        if output_dict:
            out: dict[str, Any] = {"image_intermediates": patches}
            if return_prefix_tokens:
                out["image_intermediates_prefix"] = prefixes
            if not intermediates_only:
                out["image_features"] = final
            return out
        taken: list[Any] = list(zip(patches, prefixes)) if return_prefix_tokens else patches
        return taken if intermediates_only else (final, taken)
