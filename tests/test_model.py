"""Register placement follows the paper: after [CLS], before patches, no position embedding."""

import pytest
import torch

from trainers.config import ModelConfig
from trainers.cost import forward_macs_per_image
from trainers.model import build_model, patch_tokens, register_tokens


@pytest.mark.parametrize("registers", [0, 1, 4])
def test_registers_get_no_position_embedding(registers: int) -> None:
    cfg = ModelConfig(size="micro", img_size=32, patch_size=8, num_registers=registers)
    model = build_model(cfg, num_classes=5)
    assert model.num_prefix_tokens == 1 + registers
    # Position embeddings cover the 16 patches only, never [CLS] or the registers.
    assert model.pos_embed.shape[1] == cfg.num_patches
    if registers:
        assert model.reg_token.shape == (1, registers, 64)


def test_registers_sit_between_cls_and_patches_without_position() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(size="micro", img_size=32, patch_size=8, num_registers=2)
    model = build_model(cfg, num_classes=5).eval()
    with torch.no_grad():
        model.reg_token.fill_(7.0)
        model.cls_token.fill_(-3.0)
        tokens = model._pos_embed(model.patch_embed(torch.randn(2, 3, 32, 32)))
    assert tokens.shape[1] == 1 + 2 + cfg.num_patches
    assert torch.all(tokens[:, 0] == -3.0)  # [CLS] first, untouched by position embedding
    assert torch.all(register_tokens(tokens, model) == 7.0)  # registers next, untouched
    assert patch_tokens(tokens, model).shape[1] == cfg.num_patches


@pytest.mark.parametrize("registers", [0, 1, 16])
def test_output_has_right_number_of_patch_tokens(registers: int) -> None:
    cfg = ModelConfig(size="micro", img_size=32, patch_size=4, num_registers=registers)
    model = build_model(cfg, num_classes=5).eval()
    with torch.no_grad():
        tokens = model.forward_features(torch.randn(1, 3, 32, 32))
        logits = model(torch.randn(1, 3, 32, 32))
    assert tokens.shape[1] == model.num_prefix_tokens + 64
    assert patch_tokens(tokens, model).shape[1] == 64
    assert logits.shape == (1, 5)


def test_flops_grow_with_registers_as_the_paper_says() -> None:
    # Paper (Sec. 3, DINOv2-style ViT at 224 px, patch 14): +4 registers under 2% FLOPs, +16 about 6%.
    def macs(registers: int) -> int:
        return forward_macs_per_image(ModelConfig(size="base", patch_size=14, num_registers=registers), 1000)

    base, with4, with16 = macs(0), macs(4), macs(16)
    assert 1.0 < with4 / base < 1.02
    assert 1.04 < with16 / base < 1.09


def test_bad_model_configs_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown model size"):
        ModelConfig(size="enormous")
    with pytest.raises(ValueError):
        ModelConfig(num_registers=-1)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ModelConfig(img_size=30, patch_size=8)
