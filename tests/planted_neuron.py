"""A random-init ViT with one planted register neuron, and images it fires on.

The weights are edited so that one MLP unit of block `layer` fires on chosen patches and
writes a large vector into the residual stream there, which is how Jiang et al. (arXiv
2506.08010) find real artifacts being made:

* residual channel TRIGGER_DIM carries a trigger, +TRIGGER on the chosen patches and
  -TRIGGER elsewhere; no block writes into that channel (its rows of attn.proj and
  mlp.fc2 are zero), so the trigger reaches block `layer` unchanged;
* the trigger comes either from the image (`by="content"`: the patch embedding reads the
  mean of the red channel, and `background_images` paints the chosen patches +1 and the
  others -1 in red) or from the position (`by="position"`: the position embedding carries
  it at fixed patch positions, so any image sets it off);
* unit `unit` of block `layer` reads only that channel after the block's LayerNorm,
  GELU(x - 2); the trigger dominates the token, so LayerNorm maps it to about
  +-sqrt(dim) and the unit gives about sqrt(dim) - 2 on the chosen patches and 0 on the
  others; its column of mlp.fc2 is a fixed vector orthogonal to the trigger channel, scaled
  so that it writes about WRITE_NORM.

The chosen patches then leave block `layer` with a norm of about WRITE_NORM against about
TRIGGER for the rest: the outliers the probes must find, and nothing else is unusual.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer

TRIGGER_DIM = 0
TRIGGER = 10.0
WRITE_NORM = 300.0
GAIN, BIAS = 1.0, 2.0  # the unit's pre-activation: GAIN * LN(x)[TRIGGER_DIM] - BIAS


@torch.no_grad()
def plant_register_neuron(
    model: VisionTransformer, *, layer: int, unit: int, by: str = "content", positions: list[int] | None = None, seed: int = 0
) -> VisionTransformer:
    """Edit `model` in place (see the module docstring); positions: the patches for by="position"."""
    generator = torch.Generator().manual_seed(seed)
    j = TRIGGER_DIM
    proj = model.patch_embed.proj
    proj.weight[j].zero_()
    if proj.bias is not None:
        proj.bias[j] = 0.0
    if model.pos_embed is not None:
        model.pos_embed[..., j] = 0.0
    if model.cls_token is not None:
        model.cls_token[..., j] = 0.0
    if model.reg_token is not None:
        model.reg_token[..., j] = 0.0
    if by == "content":
        patch = proj.weight.shape[-1] * proj.weight.shape[-2]
        proj.weight[j, 0] = TRIGGER / patch  # TRIGGER x the patch's mean red value (+-1 in background_images)
    elif by == "position":
        if positions is None:
            raise ValueError("by='position' needs positions")
        patches_in_pos = model.pos_embed.shape[1] - (0 if model.no_embed_class else model.num_prefix_tokens)
        first = model.pos_embed.shape[1] - patches_in_pos
        trigger = torch.full((patches_in_pos,), -TRIGGER)
        trigger[positions] = TRIGGER
        model.pos_embed[0, first:, j] = trigger
    else:
        raise ValueError(f"by must be 'content' or 'position', got {by!r}")
    for block in model.blocks:  # nothing writes into the trigger channel
        block.attn.proj.weight[j].zero_()
        block.attn.proj.bias[j] = 0.0
        block.mlp.fc2.weight[j].zero_()
        block.mlp.fc2.bias[j] = 0.0
    mlp = model.blocks[layer].mlp
    mlp.fc1.weight[unit].zero_()
    mlp.fc1.weight[unit, j] = GAIN
    mlp.fc1.bias[unit] = -BIAS
    write = torch.randn(mlp.fc2.out_features, generator=generator)
    write[j] = 0.0
    peak = GAIN * mlp.fc1.in_features**0.5 - BIAS  # the unit's activation on a chosen patch, roughly
    mlp.fc2.weight[:, unit] = write / write.norm() * WRITE_NORM / peak
    return model


def background_images(
    count: int, img_size: int, patch: int, chosen_per_image: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose red channel is +1 on `chosen_per_image` random patches and -1 elsewhere
    (green and blue are noise). Returns images [B, 3, H, W] and the chosen mask [B, P]."""
    generator = torch.Generator().manual_seed(seed)
    grid = img_size // patch
    chosen = torch.zeros(count, grid * grid, dtype=torch.bool)
    for i in range(count):
        chosen[i, torch.randperm(grid * grid, generator=generator)[:chosen_per_image]] = True
    red = torch.where(chosen, 1.0, -1.0).reshape(count, 1, grid, grid)
    red = red.repeat_interleave(patch, dim=2).repeat_interleave(patch, dim=3)
    noise = torch.randn(count, 2, img_size, img_size, generator=generator)
    return torch.cat([red, noise], dim=1), chosen


def planted_trial_checkpoint(folder, cfg, *, layer: int = 1, unit: int = 7, positions: list[int] | None = None, seed: int = 0):
    """A trainer_state.pt (trainers/loop.py's format) in `folder` whose model, built from `cfg`
    (a TrainConfig), carries a register neuron planted at fixed patch positions (default: every
    eighth patch), so it makes artifacts on any data. Returns the file's path."""
    from pathlib import Path

    from trainers.model import build_model

    torch.manual_seed(seed)
    patches = cfg.model.num_patches
    model = build_model(cfg.model, cfg.data.num_classes).eval()
    plant_register_neuron(model, layer=layer, unit=unit, by="position", positions=positions or list(range(0, patches, 8)), seed=seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "trainer_state.pt"
    torch.save({"step": cfg.steps, "model": model.state_dict(), "config": cfg.model_dump()}, path)
    return path
