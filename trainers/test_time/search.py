"""Finding register neurons (Jiang et al., arXiv 2506.08010, Sec. 3; the package docstring
has the whole method and where we differ from the authors' code).

Mark outlier patches by their norm at one block's output; score every MLP hidden unit (the
input of `mlp.fc2`, i.e. after the activation) by its mean |activation| on those patches,
per image, averaged over the images that have outliers; optionally keep only sparse units
(activation below 0.5 on at least half of the image's tokens, as the authors' notebook
does); keep the top-k over blocks 0..max_layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from pydantic import Field
from timm.models.vision_transformer import VisionTransformer

from trainers.config import Strict
from trainers.late_registers import prefix_tokens_at
from trainers.probes.capture import unwrap
from trainers.probes.outliers import robust_threshold

SPARSE_ACTIVATION = 0.5  # the authors' sparsity filter: a unit is "off" on a token below this ...
SPARSE_FRACTION = 0.5  # ... and must be off on at least this share of the image's tokens


class TestTimeRegisterConfig(Strict):
    """Parameters of the register-neuron search (the paper's defaults per family: FAMILY_DEFAULTS)."""

    __test__ = False  # not a pytest class, whatever its name

    detect_layer: int = Field(default=-1, description="block whose output marks outliers; -1 = last, -2 = second-to-last")
    threshold: float | None = Field(default=None, gt=0, description="patch norm above which a patch is an outlier; None = the probes' scale-free detector")
    top_k: int = Field(default=10, gt=0)
    max_layer: int | None = Field(default=None, ge=0, description="highest block whose units may be chosen; None = generic_max_layer(depth)")
    sparsity_filter: bool = True
    images: int = Field(default=64, gt=0, description="images the search looks at")
    chunk: int = Field(default=16, gt=0, description="images per forward pass during the search")


# The authors' configs (configs/*.yaml in their repository), by timm architecture prefix.
FAMILY_DEFAULTS: dict[str, TestTimeRegisterConfig] = {
    # OpenCLIP ViT-B/16 (LAION-2B) and OpenAI CLIP ViT-B/16: last layer, threshold 30, k=10, layers <= 5.
    "vit_base_patch16_clip": TestTimeRegisterConfig(detect_layer=-1, threshold=30.0, top_k=10, max_layer=5),
    # DINOv2 ViT-L/14: second-to-last layer, threshold 150, k=50, layers <= 17.
    "vit_large_patch14_dinov2": TestTimeRegisterConfig(detect_layer=-2, threshold=150.0, top_k=50, max_layer=17),
}


def default_config(arch: str | None) -> TestTimeRegisterConfig:
    """The paper's parameters for a known family, else the generic ones (robust detector,
    last layer, k=10, cap at two thirds of the depth)."""
    for prefix, cfg in FAMILY_DEFAULTS.items():
        if arch and arch.startswith(prefix):
            return cfg.model_copy()
    return TestTimeRegisterConfig()


def generic_max_layer(depth: int) -> int:
    """Our cap where the paper gives none: blocks in the first two thirds (the paper's caps sit at
    one half, OpenCLIP-B 5 of 12, and three quarters, DINOv2-L 17 of 24)."""
    return max(0, (2 * depth) // 3 - 1)


@dataclass(frozen=True)
class RegisterNeuron:
    layer: int  # block index
    unit: int  # hidden unit of the block's MLP (input channel of mlp.fc2)
    score: float  # mean |activation| on outlier patches


@dataclass
class NeuronSearch:
    neurons: list[RegisterNeuron]  # best first, at most top_k
    detect_layer: int  # resolved, >= 0
    max_layer: int
    threshold: float  # the norm cutoff used (given, or the robust detector's)
    detector: str  # "abs" or "robust"
    outlier_fraction: float  # share of the search images' patches above the cutoff at detect_layer
    images: int
    images_with_outliers: int
    scores: torch.Tensor = field(repr=False, default_factory=lambda: torch.empty(0))  # [max_layer + 1, hidden]

    def by_layer(self) -> dict[int, list[int]]:
        grouped: dict[int, list[int]] = {}
        for n in self.neurons:
            grouped.setdefault(n.layer, []).append(n.unit)
        return grouped

    def summary(self) -> dict[str, object]:
        """JSON-ready description (what an MLflow run keeps as register_neurons.json)."""
        return {
            "detect_layer": self.detect_layer,
            "max_layer": self.max_layer,
            "threshold": self.threshold,
            "detector": self.detector,
            "outlier_fraction": self.outlier_fraction,
            "images": self.images,
            "images_with_outliers": self.images_with_outliers,
            "neurons": [{"layer": n.layer, "unit": n.unit, "score": n.score} for n in self.neurons],
        }


def _chunks(images: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
    for start in range(0, images.shape[0], size):
        yield images[start : start + size]


def _hidden_size(vit: VisionTransformer) -> int:
    sizes = {int(block.mlp.fc2.in_features) for block in vit.blocks}
    if len(sizes) != 1:
        raise ValueError(f"MLP hidden sizes differ between blocks: {sorted(sizes)}")
    return sizes.pop()


@torch.no_grad()
def find_register_neurons(model: torch.nn.Module, images: torch.Tensor, cfg: TestTimeRegisterConfig) -> NeuronSearch:
    """Rank MLP units by their mean |activation| on outlier patches (see the module docstring).

    images: [N, 3, H, W], normalised as the model expects. No outlier patch: no neurons.
    """
    vit = unwrap(model)
    was_training = vit.training
    vit.eval()
    try:
        return _search(vit, images, cfg)
    finally:
        vit.train(was_training)


def _search(vit: VisionTransformer, images: torch.Tensor, cfg: TestTimeRegisterConfig) -> NeuronSearch:
    depth = len(vit.blocks)
    if not -depth <= cfg.detect_layer < depth:
        raise ValueError(f"detect_layer {cfg.detect_layer} is outside a {depth}-block model")
    detect = cfg.detect_layer % depth
    cap = min(depth - 1, cfg.max_layer if cfg.max_layer is not None else generic_max_layer(depth))
    device = next(vit.parameters()).device
    images = images[: cfg.images]

    # Pass 1: patch norms at the detection layer decide which patches are outliers.
    norms = torch.cat([
        vit.forward_intermediates(
            chunk.to(device).float(), indices=[detect], norm=False, stop_early=True, output_fmt="NLC", intermediates_only=True
        )[0].norm(dim=-1)
        for chunk in _chunks(images, cfg.chunk)
    ])  # [N, P]
    detector = "abs" if cfg.threshold is not None else "robust"
    threshold = float(cfg.threshold) if cfg.threshold is not None else robust_threshold(norms)
    outliers = norms > threshold
    with_outliers = torch.nonzero(outliers.any(dim=1)).flatten()
    hidden = _hidden_size(vit)
    scores = torch.zeros(cap + 1, hidden, device=device)
    search = NeuronSearch(
        [], detect, cap, threshold, detector, float(outliers.float().mean()), int(images.shape[0]), len(with_outliers), scores
    )
    if len(with_outliers) == 0:
        return search

    # Pass 2: on the images with outliers, each unit's mean |activation| over that image's outlier patches.
    current: dict[str, torch.Tensor] = {}

    def score(layer: int):
        prefix = prefix_tokens_at(vit, layer)  # fewer before late registers enter

        def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            acts = args[0].float()  # [b, N, hidden]
            mask = current["mask"]  # [b, P]
            on_outliers = (acts[:, prefix:].abs() * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
            if cfg.sparsity_filter:
                off = (acts < SPARSE_ACTIVATION).sum(1) >= SPARSE_FRACTION * acts.shape[1]
                on_outliers = on_outliers * off
            scores[layer] += on_outliers.sum(0)

        return hook

    handles = [vit.blocks[layer].mlp.fc2.register_forward_pre_hook(score(layer)) for layer in range(cap + 1)]
    try:
        for index in _chunks(with_outliers, cfg.chunk):
            current["mask"] = outliers[index].float()
            vit.forward_intermediates(
                images[index.cpu()].to(device).float(), indices=[cap], stop_early=True, output_fmt="NLC", intermediates_only=True
            )
    finally:
        for handle in handles:
            handle.remove()
    scores /= len(with_outliers)
    top = torch.topk(scores.flatten(), min(cfg.top_k, scores.numel()))
    search.neurons = [
        RegisterNeuron(int(i) // hidden, int(i) % hidden, float(v)) for v, i in zip(top.values.tolist(), top.indices.tolist())
    ]
    return search
