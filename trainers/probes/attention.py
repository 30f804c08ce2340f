"""Last-block attention of [CLS] and of each register to the patches (paper Fig. 2, 9, 11).

timm's Attention runs fused SDPA, which never materialises the probabilities, so we
recompute them from the captured output of `attn.qkv`, exactly as the module's manual
path does: split heads, apply q_norm/k_norm, softmax(q k^T * scale). Only the prefix
query rows are computed, which costs O(prefix * tokens) instead of O(tokens^2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from timm.layers import Attention

from trainers.probes import names

NUM_SAVED_IMAGES = 8  # probe images kept in attention.npz and drawn in the figure


def split_qkv(attn: Attention, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, N, 3 * attn_dim] -> q, k, v each [B, heads, N, head_dim], q and k normed as timm does."""
    batch, tokens, _ = qkv.shape
    q, k, v = qkv.reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def attention_probs(attn: Attention, qkv: torch.Tensor, queries: slice = slice(None)) -> torch.Tensor:
    """Attention probabilities [B, heads, Q, N] for the query rows `queries` (all keys)."""
    if not isinstance(attn, Attention):
        raise TypeError(f"attention probe supports timm.layers.Attention, got {type(attn).__name__}")
    q, k, _ = split_qkv(attn, qkv)
    return ((q[:, :, queries] * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


def attention_output(attn: Attention, qkv: torch.Tensor) -> torch.Tensor:
    """The module's output rebuilt from recomputed probabilities: checks the recomputation."""
    if attn.gate is not None:
        raise ValueError("gated attention needs the block input, which the qkv hook does not see")
    _, _, v = split_qkv(attn, qkv)
    x = attention_probs(attn, qkv) @ v
    batch, _, tokens, _ = x.shape
    return attn.proj(attn.norm(x.transpose(1, 2).reshape(batch, tokens, attn.attn_dim)))


def patch_maps(probs: torch.Tensor, num_prefix: int, grid: tuple[int, int]) -> torch.Tensor:
    """Head-averaged attention over the patches, renormalised to sum 1: [B, heads, Q, N] -> [B, Q, h, w]."""
    maps = probs.mean(dim=1)[..., num_prefix:]
    maps = maps / maps.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    return maps.reshape(*maps.shape[:2], *grid)


def entropy(maps: torch.Tensor) -> torch.Tensor:
    """Entropy of each map divided by log(#patches): 1 is uniform, 0 is one patch. [..., h, w] -> [...]."""
    p = maps.flatten(-2)
    return -(p * p.clamp_min(1e-12).log()).sum(-1) / math.log(max(p.shape[-1], 2))


def total_variation(maps: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation of sum-1 maps: 0 for uniform, 4 for one isolated patch."""
    dy = (maps[..., 1:, :] - maps[..., :-1, :]).abs().flatten(-2).sum(-1)
    dx = (maps[..., :, 1:] - maps[..., :, :-1]).abs().flatten(-2).sum(-1)
    return dy + dx


@dataclass
class AttentionSummary:
    scalars: dict[str, float]
    arrays: dict[str, np.ndarray]  # contents of names.ATTENTION_FILE
    cls_maps: torch.Tensor | None  # [B, h, w], for corloc


def query_names(has_cls: bool, num_registers: int) -> list[str]:
    return (["cls"] if has_cls else []) + [f"reg_{r:02d}" for r in range(num_registers)]


def summarise_attention(
    attn: Attention,
    qkv: torch.Tensor,
    num_prefix: int,
    has_cls: bool,
    grid: tuple[int, int],
    outliers: torch.Tensor,
    images: torch.Tensor,
) -> AttentionSummary:
    """outliers: [B, P] bool patch outliers at the output; images: [B, 3, H, W] probe images."""
    maps = patch_maps(attention_probs(attn, qkv, slice(0, num_prefix)), num_prefix, grid)  # [B, Q, h, w]
    queries = query_names(has_cls, num_prefix - int(has_cls))
    ent, tv = entropy(maps).mean(0), total_variation(maps).mean(0)
    scalars: dict[str, float] = {}
    for i, query in enumerate(queries):
        scalars[names.attn("entropy", query)] = float(ent[i])
        scalars[names.attn("tv", query)] = float(tv[i])
    cls_maps = maps[:, 0] if has_cls else None
    if cls_maps is not None:
        mass = (cls_maps.flatten(1) * outliers.float()).sum(1)  # 0 on images without outliers
        scalars[names.attn("outlier_mass", "cls")] = float(mass.mean())

    n = min(NUM_SAVED_IMAGES, images.shape[0])
    cls_saved = cls_maps[:n] if cls_maps is not None else maps.new_full((n, *grid), float("nan"))
    arrays = {
        "images": to_uint8(images[:n]),
        "cls_attn": cls_saved.cpu().numpy(),
        "reg_attn": maps[:n, int(has_cls) :].cpu().numpy(),
        "outlier_mask": outliers[:n].reshape(n, *grid).cpu().numpy(),
        "queries": np.array(queries),
    }
    return AttentionSummary(scalars=scalars, arrays=arrays, cls_maps=cls_maps)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Normalised [n, 3, H, W] -> displayable uint8 [n, H, W, 3], each image stretched to its own range."""
    low = images.amin(dim=(1, 2, 3), keepdim=True)
    high = images.amax(dim=(1, 2, 3), keepdim=True)
    scaled = (images - low) / (high - low).clamp_min(1e-12)
    return (scaled * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
