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


def test_weight_init_modes() -> None:
    # 'timm' (the default) is timm's truncated normal, std 0.02, as before the option existed;
    # 'jax' is the original ViT's: xavier-uniform linear layers and a zero head. Position
    # embedding, [CLS] and registers start alike in both.
    cfg = ModelConfig(size="micro", img_size=32, patch_size=8, num_registers=4)
    torch.manual_seed(0)
    timm_init = build_model(cfg, num_classes=6)
    torch.manual_seed(0)
    jax_init = build_model(cfg.model_copy(update={"weight_init": "jax"}), num_classes=6)
    qkv = jax_init.blocks[0].attn.qkv.weight.detach()
    assert float(timm_init.blocks[0].attn.qkv.weight.detach().std()) == pytest.approx(0.02, rel=0.1)
    assert float(qkv.std()) == pytest.approx((2 / sum(qkv.shape)) ** 0.5, rel=0.1)  # xavier-uniform
    assert torch.all(jax_init.head.weight == 0) and timm_init.head.weight.abs().max() > 0
    for model in (timm_init, jax_init):
        assert model.reg_token.std() < 1e-5 and model.cls_token.std() < 1e-5
        assert float(model.pos_embed.detach().std()) == pytest.approx(0.02, rel=0.2)
    with pytest.raises(ValueError, match="'timm' or 'jax'"):
        ModelConfig(size="micro", weight_init="xavier")
