"""Typed configuration of one training run (one Tune trial).

These models are the contract between the sweep spec (orchestrator/spec.py, which
embeds them) and the trainer. They use pydantic v2 with extra keys forbidden, so a
typo anywhere in a spec is an error that names the key instead of a silent default.
They import nothing from Ray or MLflow: a notebook can build a TrainConfig by hand.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Standard ViT widths (Dosovitskiy et al.; DINOv2's giant is 1536 wide, 40 deep, 24 heads),
# plus two CPU-sized models so that a whole sweep fits on a laptop.
MODEL_SIZES: dict[str, tuple[int, int, int]] = {
    # name: (embed_dim, depth, num_heads)
    "micro": (64, 4, 2),
    "mini": (96, 6, 3),
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
    "giant": (1536, 40, 24),
}


class Strict(BaseModel):
    """Base for every config block: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Strict):
    size: str | None = Field(default="tiny", description=f"one of {sorted(MODEL_SIZES)}, or null with explicit dims")
    embed_dim: int | None = Field(default=None, gt=0)
    depth: int | None = Field(default=None, gt=0)
    num_heads: int | None = Field(default=None, gt=0)
    patch_size: int = Field(default=16, gt=0)
    img_size: int = Field(default=224, gt=0)
    num_registers: int = Field(default=0, ge=0, strict=True)
    mlp_ratio: float = Field(default=4.0, gt=0)
    drop_path_rate: float = Field(default=0.0, ge=0, lt=1)
    weight_init: Literal["timm", "jax"] = Field(
        default="timm",
        description="'timm': truncated normal (std 0.02), as DeiT-III and DINOv2 train; 'jax': the original "
        "ViT's (xavier-uniform linear layers, zero head), with which small ViTs leave their initial plateau sooner",
    )

    @model_validator(mode="after")
    def _check_dims(self) -> "ModelConfig":
        if self.size is not None and self.size not in MODEL_SIZES:
            raise ValueError(f"unknown model size {self.size!r}; known sizes: {', '.join(MODEL_SIZES)}")
        if self.size is None and None in (self.embed_dim, self.depth, self.num_heads):
            raise ValueError("with size: null, set embed_dim, depth and num_heads")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        dim, _, heads = self.dims
        if dim % heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {heads}")
        return self

    @property
    def dims(self) -> tuple[int, int, int]:
        """(embed_dim, depth, num_heads): explicit values override the size table."""
        base = MODEL_SIZES[self.size] if self.size is not None else (0, 0, 0)
        return (self.embed_dim or base[0], self.depth or base[1], self.num_heads or base[2])

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def label(self) -> str:
        """Short name for tags and tables: the size name, or the dims when they are explicit."""
        dim, depth, heads = self.dims
        if self.size is not None and (dim, depth, heads) == MODEL_SIZES[self.size]:
            return self.size
        return f"d{dim}x{depth}h{heads}"


# The shape kinds of the generated 'shapes' set, in their default class order
# (trainers/data/shapes.py draws them; listed here so that a spec is checked without torch).
ShapeKind = Literal["disc", "square", "triangle", "ring", "cross", "diamond", "bar", "star"]
SHAPE_KINDS: tuple[str, ...] = get_args(ShapeKind)


class DataConfig(Strict):
    name: Literal["shapes", "cifar10", "cifar100", "imagefolder"] = "shapes"
    root: str | None = Field(default=None, description="dataset directory for real data; ${ENV_VAR} is expanded")
    # Parameters of the generated 'shapes' data set (ignored for real data).
    num_classes: int = Field(default=6, ge=2)
    train_size: int = Field(default=8192, gt=0, description="shapes: distinct training images before they repeat")
    val_size: int = Field(default=512, gt=0)
    shapes: list[ShapeKind] | None = Field(
        default=None, description="shapes: the kind of each class, in class order; default the first num_classes kinds"
    )
    object_area: tuple[float, float] = Field(
        default=(0.10, 0.30), description="shapes: range of the fraction of the image an object covers"
    )
    rotation: float = Field(default=1.0, ge=0, le=1, description="shapes: fraction of each kind's rotation range; 0 = upright")
    colours: Literal["random", "light_on_dark"] = Field(
        default="random",
        description="shapes: 'random' object and background colours (the object is darker or lighter); "
        "'light_on_dark' light objects on dark backgrounds",
    )
    num_workers: int = Field(default=2, ge=0, description="DataLoader workers for real data")

    @model_validator(mode="after")
    def _check_shapes(self) -> "DataConfig":
        lo, hi = self.object_area
        # Background must stay most of the image: the paper finds artifacts on redundant background patches.
        if not 0 < lo <= hi <= 0.5:
            raise ValueError(f"object_area must satisfy 0 < low <= high <= 0.5; got {list(self.object_area)}")
        if self.shapes is not None:
            if len(set(self.shapes)) != len(self.shapes):
                raise ValueError(f"shapes lists a kind twice: {self.shapes}")
            if len(self.shapes) != self.num_classes:
                raise ValueError(f"shapes lists {len(self.shapes)} kinds but num_classes is {self.num_classes}")
        return self

    @property
    def shape_kinds(self) -> tuple[str, ...]:
        """The 'shapes' kind of each class: `shapes` if given, else the first num_classes kinds."""
        return tuple(self.shapes) if self.shapes is not None else SHAPE_KINDS[: self.num_classes]


class OptimConfig(Strict):
    name: Literal["adamw"] = "adamw"
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.05, ge=0)
    beta1: float = Field(default=0.9, gt=0, lt=1)
    beta2: float = Field(default=0.999, gt=0, lt=1)
    warmup_steps: int = Field(default=0, ge=0)
    min_lr_ratio: float = Field(default=0.01, ge=0, le=1, description="cosine decays to lr * min_lr_ratio")
    grad_clip: float | None = Field(default=1.0, gt=0)
    batch_size: int = Field(default=64, gt=0)


class ProbeConfig(Strict):
    every: int = Field(default=0, ge=0, description="probe every N steps; 0 = only at the end")
    at_end: bool = True
    batch_size: int = Field(default=32, gt=0, description="fixed probe batch from the val split")
    outlier_cutoff: float = Field(default=150.0, gt=0, description="absolute norm cutoff (paper: 150 for DINOv2 ViT-g)")
    figures: Literal["end", "every", "off"] = Field(
        default="end", description="PNG figures at the final probe only, at every probe, or never"
    )


class TrainConfig(Strict):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    probe: ProbeConfig = ProbeConfig()
    steps: int = Field(default=1000, gt=0)
    eval_every: int = Field(default=0, ge=0, description="validate every N steps; 0 = only at the end")
    log_every: int = Field(default=10, gt=0)
    checkpoint_every: int = Field(default=0, ge=0, description="checkpoint every N steps; 0 = at evals and the end")
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = False
    seed: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _check_cadence(self) -> "TrainConfig":
        for key in ("eval_every", "checkpoint_every"):
            if getattr(self, key) > self.steps:
                raise ValueError(f"{key} ({getattr(self, key)}) is larger than steps ({self.steps})")
        return self
