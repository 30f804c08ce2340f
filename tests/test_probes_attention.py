"""The recomputed attention is the model's own attention, and its statistics mean what they say."""

from __future__ import annotations

import math

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from trainers.probes.attention import (
    attention_output,
    attention_probs,
    entropy,
    patch_maps,
    total_variation,
)
from trainers.probes.capture import capture


def vit(registers: int, qk_norm: bool) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, num_classes=3,
                             reg_tokens=registers, no_embed_class=True, qk_norm=qk_norm).eval()


@pytest.mark.parametrize("registers,qk_norm", [(0, False), (3, False), (2, True)])
def test_recomputed_attention_reproduces_the_attention_module_output(registers, qk_norm):
    model = vit(registers, qk_norm)
    attn = model.blocks[-1].attn
    seen: dict[str, torch.Tensor] = {}
    handle = attn.register_forward_hook(lambda _m, _i, out: seen.__setitem__("out", out))
    with torch.no_grad():
        cap = capture(model, torch.randn(4, 3, 32, 32))
        rebuilt = attention_output(attn, cap.qkv)
    handle.remove()
    assert rebuilt.shape == seen["out"].shape
    torch.testing.assert_close(rebuilt, seen["out"], atol=1e-5, rtol=1e-5)


def test_prefix_rows_match_the_full_attention_and_are_distributions():
    model = vit(2, False)
    with torch.no_grad():
        cap = capture(model, torch.randn(2, 3, 32, 32))
        full = attention_probs(model.blocks[-1].attn, cap.qkv)
        prefix = attention_probs(model.blocks[-1].attn, cap.qkv, slice(0, cap.num_prefix))
    torch.testing.assert_close(prefix, full[:, :, : cap.num_prefix])
    torch.testing.assert_close(full.sum(-1), torch.ones(full.shape[:-1]))
    maps = patch_maps(full[:, :, : cap.num_prefix], cap.num_prefix, cap.grid)
    assert maps.shape == (2, cap.num_prefix, 8, 8)
    torch.testing.assert_close(maps.flatten(-2).sum(-1), torch.ones(2, cap.num_prefix))


def test_entropy_and_total_variation_of_extreme_maps():
    uniform = torch.full((8, 8), 1 / 64)
    peak = torch.zeros(8, 8)
    peak[3, 4] = 1.0
    assert float(entropy(uniform)) == pytest.approx(1.0)
    assert float(entropy(peak)) == pytest.approx(0.0, abs=1e-6)
    assert float(total_variation(uniform)) == pytest.approx(0.0)
    assert float(total_variation(peak)) == pytest.approx(4.0)
    # A smooth blob has lower TV than the same mass split over scattered single patches.
    blob = torch.zeros(8, 8)
    blob[2:6, 2:6] = 1 / 16
    scattered = torch.zeros(8, 8)
    scattered.view(-1)[torch.arange(0, 64, 4)] = 1 / 16
    assert float(total_variation(blob)) < float(total_variation(scattered))
    assert float(entropy(blob)) == pytest.approx(math.log(16) / math.log(64))
