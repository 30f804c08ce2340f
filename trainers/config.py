"""Typed configuration of one training run (one Tune trial).

These models are the contract between the sweep spec (orchestrator/spec/schema.py, which
embeds them) and the trainer. They use pydantic v2 with extra keys forbidden, so a
typo anywhere in a spec is an error that names the key instead of a silent default.
They import nothing from Ray or MLflow: a notebook can build a TrainConfig by hand.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field, model_validator

# The objectives' recipe blocks live in their own module; `from trainers.config import DinoConfig` works too.
from trainers.objective_config import ClipConfig, DinoConfig  # noqa: F401
from trainers.strict import Strict

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


class ModelConfig(Strict):
    size: str | None = Field(default="tiny", description=f"one of {sorted(MODEL_SIZES)}, or null with explicit dims")
    embed_dim: int | None = Field(default=None, gt=0)
    depth: int | None = Field(default=None, gt=0)
    num_heads: int | None = Field(default=None, gt=0)
    patch_size: int = Field(default=16, gt=0)
    img_size: int = Field(default=224, gt=0)
    num_registers: int = Field(default=0, ge=0, strict=True)
    register_depth: int = Field(
        default=0,
        ge=0,
        strict=True,
        description="index of the block before which the registers enter the sequence; 0 = at the input (the paper)",
    )
    mlp_ratio: float = Field(default=4.0, gt=0)
    drop_path_rate: float = Field(default=0.0, ge=0, lt=1)
    drop_path_mode: Literal["linear", "uniform"] = Field(
        default="linear", description="stochastic depth per block: linear 0 -> rate (timm) or the rate in every block (DeiT-III)"
    )
    layer_scale: float | None = Field(
        default=None, gt=0, description="LayerScale init value (DeiT-III: 1e-4 in its code, timm's deit3: 1e-6); null = off"
    )
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
        dim, depth, heads = self.dims
        if dim % heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {heads}")
        if self.register_depth >= depth:
            raise ValueError(f"register_depth {self.register_depth} is no block of a {depth}-block model (0 to {depth - 1})")
        if self.register_depth and not self.num_registers:
            # Refused rather than ignored: a depth names where registers enter. (A grid that crosses depths
        # with a register axis keeps its no-register cell once, at depth 0: orchestrator/spec/cells.py.)
            raise ValueError(
                f"register_depth {self.register_depth} places registers, but num_registers is 0 "
                "(a grid may cross model.num_registers [0, N] with depths: its no-register cell is kept once; see sweeps/register_depth.yaml)"
            )
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


# Data sets whose training images come with captions (the CLIP objective needs them) and
# those whose training images come with class labels (the supervised objective needs them).
CAPTIONED_DATA = ("shapes", "webdataset", "csv")
LABELLED_DATA = ("shapes", "cifar10", "cifar100", "imagefolder", "shards")

# The shape kinds of the generated 'shapes' set, in their default class order
# (trainers/data/shapes.py draws them; listed here so that a spec is checked without torch).
ShapeKind = Literal["disc", "square", "triangle", "ring", "cross", "diamond", "bar", "star"]
SHAPE_KINDS: tuple[str, ...] = get_args(ShapeKind)


class DataConfig(Strict):
    name: Literal["shapes", "cifar10", "cifar100", "imagefolder", "shards", "webdataset", "csv"] = "shapes"
    root: str | None = Field(
        default=None,
        description="real data: a directory (webdataset: of *.tar shards; shards: as `python -m trainers.data.shards write` lays them out), a CSV file (csv) or s3://; ${ENV_VAR} is expanded",
    )
    val_root: str | None = Field(
        default=None,
        description="webdataset/csv: labelled validation images in ImageFolder layout (<class>/*.jpg) for evaluation and probes",
    )
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
    decode: Literal["auto", "cpu", "gpu"] = Field(
        default="auto",
        description="shards: where images are decoded and cropped; gpu = batched torchcodec decode_jpeg on the "
        "trainer's device (nvJPEG) and one batched crop, cpu = in the DataLoader workers; auto = gpu on CUDA",
    )

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
    name: Literal["adamw", "lamb"] = Field(default="adamw", description="lamb: timm.optim.Lamb (DeiT-III)")
    lr: float = Field(default=1e-3, gt=0, description="at lr_ref_batch when set, else at batch_size as is")
    lr_ref_batch: int | None = Field(
        default=None, gt=0, description="lr is given for this global batch and scaled linearly: lr * batch_size / lr_ref_batch"
    )
    weight_decay: float = Field(default=0.05, ge=0)
    beta1: float = Field(default=0.9, gt=0, lt=1)
    beta2: float = Field(default=0.999, gt=0, lt=1)
    warmup_steps: int = Field(default=0, ge=0)
    min_lr_ratio: float = Field(default=0.01, ge=0, le=1, description="cosine decays to lr * min_lr_ratio")
    grad_clip: float | None = Field(default=1.0, gt=0)
    batch_size: int = Field(default=64, gt=0)

    @property
    def scaled_lr(self) -> float:
        """The peak learning rate the optimizer uses: lr scaled linearly from lr_ref_batch to batch_size."""
        return self.lr if self.lr_ref_batch is None else self.lr * self.batch_size / self.lr_ref_batch


class AugmentConfig(Strict):
    """DeiT-III's training-time augmentation and targets (Touvron et al. 2022). All off by default.

    Supervised objective only; 3-Augment and the mixing run on the batch tensors on the device.
    """

    three_augment: bool = Field(
        default=False,
        description="RandomResizedCrop 0.08-1 bicubic + flip, one of grayscale/solarize/blur, ColorJitter (on the device)",
    )
    color_jitter: float = Field(default=0.3, ge=0, description="3-Augment: brightness, contrast and saturation strength")
    repeats: int = Field(
        default=1, ge=1, description="repeated augmentation: ceil(batch / repeats) images per step, each this many times, augmented apart"
    )
    mixup: float = Field(default=0.0, ge=0, description="Mixup alpha (DeiT-III 0.8); 0 = off")
    cutmix: float = Field(default=0.0, ge=0, description="CutMix alpha (DeiT-III 1.0); 0 = off")
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    loss: Literal["ce", "bce"] = Field(default="ce", description="bce: timm BinaryCrossEntropy (DeiT-III)")
    bce_target_threshold: float | None = Field(
        default=0.0, ge=0, lt=1, description="bce: targets binarised (> threshold -> 1) after mixing; null keeps them soft"
    )

    @property
    def mixing(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    def images_per_step(self, batch_size: int) -> int:
        """Distinct images a step draws from the data: with repeats, ceil(batch_size / repeats)."""
        return -(-batch_size // self.repeats)

    @property
    def active(self) -> bool:
        return self.three_augment or self.repeats > 1 or self.mixing or self.label_smoothing > 0 or self.loss != "ce"

    @model_validator(mode="after")
    def _check(self) -> "AugmentConfig":
        if self.repeats > 1 and not self.three_augment:
            raise ValueError("repeats > 1 needs three_augment: true, else the repeated copies would be identical")
        if self.loss == "bce" and self.label_smoothing > 0 and self.bce_target_threshold == 0:
            raise ValueError(
                "label_smoothing with bce_target_threshold 0 binarises every target to 1; raise the threshold or set it null"
            )
        return self


class ProbeConfig(Strict):
    every: int = Field(default=0, ge=0, description="probe every N steps; 0 = only at the end")
    at_end: bool = True
    batch_size: int = Field(default=32, gt=0, description="fixed probe batch from the val split")
    outlier_cutoff: float = Field(default=150.0, gt=0, description="absolute norm cutoff (paper: 150 for DINOv2 ViT-g)")
    figures: Literal["end", "every", "off"] = Field(
        default="end", description="PNG figures at the final probe only, at every probe, or never"
    )
    # Emergence of artifacts, watched while the trial trains (trainers/emergence/, docs/probes.md).
    monitor: bool = Field(
        default=True, description="watch the probes' output outlier fraction for the emergence of artifacts"
    )
    emergence_consecutive: int = Field(
        default=3, ge=1, description="K: artifacts emerged at the first of K consecutive flagged regular probes"
    )
    emergence_min_fraction: float = Field(
        default=0.005, gt=0, le=1, description="a probe is flagged when at least this fraction of output patches are outliers"
    )
    adaptive: bool = Field(
        default=False,
        description="on a first flagged probe, probe every every/8 steps (back over the window since the last clean "
        "probe, from weight snapshots, and on) until the event is confirmed or dismissed",
    )
    on_emergence: Literal["continue", "alert", "stop"] = Field(
        default="continue",
        description="when artifacts emerge: go on; go on with a console line and the tag emergence.alert=true; "
        "or stop the trial (a sweep that only maps where artifacts appear)",
    )
    keep_checkpoints_at: list[float] = Field(
        default=[], description="fractions of training (e.g. [0.25, 0.5, 0.75]) where a checkpoint is written and kept"
    )

    @model_validator(mode="after")
    def _check_emergence(self) -> "ProbeConfig":
        bad = [f for f in self.keep_checkpoints_at if not 0 < f <= 1]
        if bad:
            raise ValueError(f"keep_checkpoints_at takes fractions of training in (0, 1]; got {bad[0]}")
        if self.adaptive and (not self.monitor or self.every < 2):
            raise ValueError("adaptive probing refines the regular probes: it needs monitor: true and every >= 2")
        if self.on_emergence != "continue" and not self.monitor:
            raise ValueError(f"on_emergence {self.on_emergence!r} needs monitor: true")
        return self


class TrainConfig(Strict):
    objective: Literal["supervised", "dino", "clip"] = Field(
        default="supervised", description="what the ViT learns from: labels, self-distillation or captions"
    )
    dino: DinoConfig = DinoConfig()
    clip: ClipConfig = ClipConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    augment: AugmentConfig = AugmentConfig()
    probe: ProbeConfig = ProbeConfig()
    steps: int = Field(default=1000, gt=0)
    eval_every: int = Field(default=0, ge=0, description="validate every N steps; 0 = only at the end")
    log_every: int = Field(default=10, gt=0)
    checkpoint_every: int = Field(default=0, ge=0, description="checkpoint every N steps; 0 = at evals and the end")
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = False
    compile_backend: Literal["inductor", "aot_eager", "eager"] = Field(
        default="inductor",
        description="torch.compile backend: inductor (GPU trials); aot_eager or eager check the same graphs "
        "in seconds on a CPU (trainers/compile.py)",
    )
    grad_checkpointing: bool = Field(
        default=False,
        description="recompute each block's activations in the backward pass (timm's set_grad_checkpointing): ViT-L and larger",
    )
    seed: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _check_cadence(self) -> "TrainConfig":
        for key in ("eval_every", "checkpoint_every"):
            if getattr(self, key) > self.steps:
                raise ValueError(f"{key} ({getattr(self, key)}) is larger than steps ({self.steps})")
        return self

    @model_validator(mode="after")
    def _check_objective(self) -> "TrainConfig":
        data = self.data.name
        if self.objective == "clip" and data not in CAPTIONED_DATA:
            raise ValueError(f"objective clip needs captions: data.name must be one of {', '.join(CAPTIONED_DATA)}, not {data!r}")
        if self.objective == "supervised" and data not in LABELLED_DATA:
            raise ValueError(f"objective supervised needs class labels: data {data!r} has captions only")
        if data in ("webdataset", "csv") and self.data.val_root is None:
            raise ValueError(f"data {data!r} needs data.val_root: labelled images (ImageFolder layout) to evaluate and probe")
        if self.compile and self.objective != "supervised":
            # trainers/loop.py compiles the supervised forward only; saying so beats a silent eager run.
            raise ValueError(f"train.compile compiles objective supervised only; objective {self.objective!r} runs eagerly: set compile: false")
        if self.augment.active and self.objective != "supervised":
            raise ValueError(f"the augment block (DeiT-III recipe) is for objective supervised, not {self.objective!r}")
        a, batch = self.augment, self.optim.batch_size
        if a.mixing and batch % 2:
            raise ValueError(f"optim.batch_size {batch} must be even with mixup/cutmix (timm's Mixup pairs images)")
        if self.objective == "dino" and self.dino.local_crops and self.dino.local_crop_size % self.model.patch_size:
            raise ValueError(
                f"dino.local_crop_size {self.dino.local_crop_size} is not a multiple of model.patch_size {self.model.patch_size}"
            )
        return self


def data_parallel_problem(cfg: TrainConfig, workers: int) -> str | None:
    """Why `workers` data-parallel ranks could not train this config, or None.

    Ranks split the global batch of a step into equal shares and DDP averages their gradients:
    exact for a loss that is a mean of per-image terms. Batch statistics are gathered: DINO's
    centring sums are all-reduced, CLIP gathers every rank's features for its negatives
    (trainers/objectives/). Every objective needs the global batch to split evenly."""
    if workers == 1:
        return None
    if cfg.optim.batch_size % workers:
        return f"the global batch optim.batch_size {cfg.optim.batch_size} must split evenly over {workers} workers"
    return None
