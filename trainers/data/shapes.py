"""'shapes': the embedded default data set, generated from the seed with no files.

One object per image on a large, smooth background (a colour plus a linear gradient and
one low-frequency wave). The object's shape kind is the class label; its colour, size,
position and rotation vary. Most of each image is redundant background on purpose: the
paper finds artifact tokens on such patches. Each image also has a per-pixel mask
(0 background, c + 1 on the object of class c), so dense metrics are possible.

How hard it is to learn is set by DataConfig: which kinds are the classes, the object's
area range, how far it may rotate and whether colours are random (the object may be
darker or lighter than the background, so a model must learn contrast in any direction)
or light objects on dark backgrounds. On a CPU budget, small ViTs learn large, upright,
light-on-dark objects within a few hundred steps, and stay near chance on random colours.

Every image's parameters are drawn once at construction with a CPU torch.Generator
seeded from (seed, split); a batch is then rendered on the target device from its
parameter rows by broadcasting over a pixel grid (one loop over shape kinds, none over
images).
"""

from __future__ import annotations

import math
from itertools import count
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from .base import Batch
from .captions import describe
from .sampling import EpochOrder, derive_seed, share_keys

if TYPE_CHECKING:
    from .collate import CaptionTokens
    from .crops import CropPlan

Tensor = torch.Tensor

# Shape tests in object coordinates (u, v): the object's extent (bounding radius) is 1.


def _disc(u: Tensor, v: Tensor) -> Tensor:
    return u * u + v * v < 1.0


def _square(u: Tensor, v: Tensor) -> Tensor:
    return torch.maximum(u.abs(), v.abs()) < 1.0 / math.sqrt(2.0)


def _triangle(u: Tensor, v: Tensor) -> Tensor:
    # Equilateral triangle inscribed in the unit circle: each edge lies 0.5 from the centre.
    inside = v > -0.5
    for angle in (math.pi / 6, 5 * math.pi / 6):
        inside &= u * math.cos(angle) + v * math.sin(angle) < 0.5
    return inside


def _ring(u: Tensor, v: Tensor) -> Tensor:
    rr = u * u + v * v
    return (rr < 1.0) & (rr > 0.55**2)


def _cross(u: Tensor, v: Tensor) -> Tensor:
    au, av = u.abs(), v.abs()
    return ((au < 1.0) & (av < 0.3)) | ((av < 1.0) & (au < 0.3))


def _diamond(u: Tensor, v: Tensor) -> Tensor:
    return u.abs() + v.abs() < 1.0


def _bar(u: Tensor, v: Tensor) -> Tensor:
    return (u.abs() < 1.0) & (v.abs() < 0.35)


def _star(u: Tensor, v: Tensor) -> Tensor:
    # Smooth five-pointed star: radius 0.6 + 0.4 cos(5 phi).
    return torch.sqrt(u * u + v * v) < 0.6 + 0.4 * torch.cos(5.0 * torch.atan2(v, u))


ShapeTest = Callable[[Tensor, Tensor], Tensor]
# name: (test, area / extent^2, rotation range in radians). Square, diamond and cross
# rotate little so that a square never turns into a diamond.
SHAPES: dict[str, tuple[ShapeTest, float, float]] = {
    "disc": (_disc, math.pi, 0.0),
    "square": (_square, 2.0, 0.3),
    "triangle": (_triangle, 3 * math.sqrt(3) / 4, math.pi),
    "ring": (_ring, math.pi * (1 - 0.55**2), 0.0),
    "cross": (_cross, 2.04, 0.3),
    "diamond": (_diamond, 2.0, 0.3),
    "bar": (_bar, 1.4, math.pi),
    "star": (_star, 0.44 * math.pi, math.pi),
}
SHAPE_NAMES = tuple(SHAPES)  # trainers.config.SHAPE_KINDS lists them too, for specs checked without torch
MAX_CLASSES = len(SHAPES)
OBJECT_AREA = (0.10, 0.30)  # default fraction of the image an object covers, before edge clipping
# 'light_on_dark' colours, per channel: every channel of the object is above every channel of the
# background's base colour, so brightness alone tells object from background.
LIGHT_OBJECT = (0.7, 1.0)
DARK_BACKGROUND = (0.1, 0.45)

# Columns of the per-image parameter table.
CX, CY, EXTENT, ANGLE = 0, 1, 2, 3
FG = slice(4, 7)  # object colour
BG = slice(7, 10)  # background base colour
GRAD_X, GRAD_Y = 10, 11  # background gradient: direction * strength
GRAD_RGB = slice(12, 15)  # colour change along the gradient
WAVE_X, WAVE_Y = 15, 16  # low-frequency wave vector, cycles per image
WAVE_PHASE = 17
WAVE_RGB = slice(18, 21)  # wave amplitude per channel
NUM_PARAMS = 21


def draw_parameters(
    n: int,
    num_classes: int,
    seed: int,
    *,
    kinds: tuple[str, ...] | None = None,
    object_area: tuple[float, float] = OBJECT_AREA,
    rotation: float = 1.0,
    colours: str = "random",
) -> tuple[Tensor, Tensor]:
    """(params float32 [n, NUM_PARAMS], labels int64 [n]) on CPU, a pure function of the arguments.

    Class c is the shape kind kinds[c] (default: the first num_classes kinds); `rotation`
    scales each kind's rotation range. The defaults draw exactly what earlier versions drew.
    """
    kinds = kinds if kinds is not None else SHAPE_NAMES[:num_classes]
    if len(kinds) != num_classes:
        raise ValueError(f"{len(kinds)} shape kinds for {num_classes} classes")
    gen = torch.Generator().manual_seed(seed)

    def uniform(lo: float, hi: float, *shape: int) -> Tensor:
        return lo + (hi - lo) * torch.rand(n, *shape, generator=gen)

    # Balanced classes, in random order.
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=gen)]
    area_per_r2 = torch.tensor([SHAPES[name][1] for name in kinds])[labels]
    max_angle = rotation * torch.tensor([SHAPES[name][2] for name in kinds])[labels]

    p = torch.empty(n, NUM_PARAMS)
    p[:, EXTENT] = torch.sqrt(uniform(*object_area) / area_per_r2)
    # Keep the centre far enough in that at most a sliver of a large object is clipped.
    margin = 0.9 * p[:, EXTENT].clamp(max=0.5)
    p[:, CX] = margin + (1 - 2 * margin) * torch.rand(n, generator=gen)
    p[:, CY] = margin + (1 - 2 * margin) * torch.rand(n, generator=gen)
    p[:, ANGLE] = max_angle * uniform(-1.0, 1.0)

    light_on_dark = colours == "light_on_dark"
    bg = uniform(*DARK_BACKGROUND, 3) if light_on_dark else uniform(0.15, 0.85, 3)
    p[:, BG] = bg
    grad_angle = uniform(0.0, 2 * math.pi)
    p[:, [GRAD_X, GRAD_Y]] = uniform(0.0, 1.0, 1) * torch.stack([grad_angle.cos(), grad_angle.sin()], 1)
    p[:, GRAD_RGB] = uniform(-0.25, 0.25, 3)
    wave_angle = uniform(0.0, 2 * math.pi)
    p[:, [WAVE_X, WAVE_Y]] = uniform(0.5, 1.5, 1) * torch.stack([wave_angle.cos(), wave_angle.sin()], 1)
    p[:, WAVE_PHASE] = uniform(0.0, 2 * math.pi)
    p[:, WAVE_RGB] = uniform(0.0, 0.08, 3)

    if light_on_dark:
        p[:, FG] = uniform(*LIGHT_OBJECT, 3)
        return p, labels
    # A random object colour, unless it is too close to the background: then a colour
    # pushed away from the background in every channel.
    candidate = uniform(0.0, 1.0, 3)
    push = uniform(0.3, 0.55, 3)
    opposite = torch.where(bg > 0.5, bg - push, bg + push)
    too_close = (candidate - bg).norm(dim=1, keepdim=True) < 0.5
    p[:, FG] = torch.where(too_close, opposite, candidate)
    return p, labels


def captions(params: Tensor, labels: Tensor) -> list[str]:
    """One caption per parameter row (CPU), e.g. "a large red ring in the top left on a blue
    background": the object colour as drawn (clamped to [0, 1], as the renderer clamps it)."""
    area_per_r2 = torch.tensor([SHAPES[name][1] for name in SHAPE_NAMES])[labels]
    return describe(
        [SHAPE_NAMES[k] for k in labels.tolist()],
        params[:, EXTENT] ** 2 * area_per_r2,  # object area before edge clipping
        OBJECT_AREA,
        params[:, CX],
        params[:, CY],
        params[:, FG].clamp(0.0, 1.0),
        params[:, BG],
    )


class ShapesSource:
    """Procedural images of `num_classes` shape kinds with per-pixel masks.

    kinds, object_area, rotation and colours are draw_parameters' (DataConfig's shapes,
    object_area, rotation and colours); their defaults keep the original data set.

    plan: training crops. A generated image has no larger original, so with a plan the image is
    rendered at img_size and the plan's host-drawn boxes are cut from it on the device
    (crops.cut_same_size), the same boxes a real source would cut from its decoded image.
    tokens: tokenise the training captions (CLIP); each image's tokens are kept once made.
    rank, world_size: train_batches yields rank's share of the global batch (base.py).
    """

    has_masks = True

    def __init__(
        self,
        *,
        num_classes: int,
        train_size: int,
        val_size: int,
        img_size: int,
        seed: int,
        device: torch.device,
        kinds: tuple[str, ...] | None = None,
        object_area: tuple[float, float] = OBJECT_AREA,
        rotation: float = 1.0,
        colours: str = "random",
        plan: "CropPlan | None" = None,
        tokens: "CaptionTokens | None" = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.plan, self.tokenize, self.rank, self.world_size = plan, tokens, rank, world_size
        self._tokens: dict[int, Tensor] = {}
        if not 2 <= num_classes <= MAX_CLASSES:
            raise ValueError(
                f"shapes supports 2 to {MAX_CLASSES} classes ({', '.join(SHAPE_NAMES)}); got num_classes={num_classes}"
            )
        self.num_classes = num_classes
        self.kinds = tuple(kinds) if kinds is not None else SHAPE_NAMES[:num_classes]
        self.img_size = img_size
        self.seed = seed
        self.device = device
        self._splits: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
        self._cpu_params: dict[str, Tensor] = {}
        self.class_names = list(SHAPE_NAMES[:num_classes])
        for split, size in (("train", train_size), ("val", val_size)):
            params, labels = draw_parameters(
                size,
                num_classes,
                derive_seed(seed, "shapes", split),
                kinds=self.kinds,
                object_area=object_area,
                rotation=rotation,
                colours=colours,
            )
            # Labels stay on the CPU too, so that grouping a batch by shape kind needs no device sync.
            self._splits[split] = (params.to(device), labels.to(device), labels)
            self._cpu_params[split] = params  # captions are read on the host, without a device sync
        self._order = EpochOrder(train_size, derive_seed(seed, "shapes", "order"))
        self._mean = torch.zeros(3, device=device)
        self._std = torch.ones(3, device=device)
        self._set_normalisation()

    def _set_normalisation(self) -> None:
        # Per-channel statistics of a sample of training images, at a small size (they barely depend on it).
        n = min(256, len(self._splits["train"][2]))
        images = self._render("train", torch.arange(n), size=32, normalise=False).images
        self._mean = images.mean(dim=(0, 2, 3))
        self._std = images.std(dim=(0, 2, 3)).clamp(min=1e-3)

    @property
    def pixel_stats(self) -> tuple[Tensor, Tensor]:
        """(mean, std) per channel of the normalisation: device-side augmentation undoes it."""
        return self._mean, self._std

    def _grid(self, size: int) -> tuple[Tensor, Tensor]:
        centres = (torch.arange(size, device=self.device, dtype=torch.float32) + 0.5) / size
        return centres.view(1, size, 1), centres.view(1, 1, size)  # ys, xs

    def _to_device(self, t: Tensor) -> Tensor:
        """A small CPU index tensor on the device without a host sync: a plain .to(cuda) waits
        for the queued training step to finish; a pinned, non-blocking copy queues behind it."""
        if self.device.type != "cuda":
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)

    def _render(self, split: str, rows: Tensor, *, size: int, normalise: bool = True) -> Batch:
        """The images of the given rows (CPU indices into the split's parameter table), with masks."""
        params_all, labels_all, labels_cpu_all = self._splits[split]
        rows_dev = self._to_device(rows)
        p = params_all[rows_dev]
        labels, labels_cpu = labels_all[rows_dev], labels_cpu_all[rows]
        ys, xs = self._grid(size)

        def col(i: int) -> Tensor:
            return p[:, i].view(-1, 1, 1)

        def rgb(s: slice) -> Tensor:
            return p[:, s].view(-1, 3, 1, 1)

        dx, dy = xs - col(CX), ys - col(CY)
        cos, sin, extent = torch.cos(col(ANGLE)), torch.sin(col(ANGLE)), col(EXTENT)
        u, v = (cos * dx + sin * dy) / extent, (cos * dy - sin * dx) / extent
        inside = torch.zeros(u.shape, dtype=torch.bool, device=self.device)
        for k in torch.unique(labels_cpu).tolist():
            idx = self._to_device((labels_cpu == k).nonzero().squeeze(1))
            inside[idx] = SHAPES[self.kinds[k]][0](u[idx], v[idx])

        # Background = colour + linear gradient + one low-frequency wave. The wave
        # cos(a x + b y + phase) is expanded into separable row and column factors so that
        # no trigonometry runs per pixel.
        gradient = (col(GRAD_X) * (xs - 0.5) + col(GRAD_Y) * (ys - 0.5)).unsqueeze(1)
        wx = 2 * math.pi * col(WAVE_X) * xs + col(WAVE_PHASE)
        wy = 2 * math.pi * col(WAVE_Y) * ys
        wave = (torch.cos(wx) * torch.cos(wy) - torch.sin(wx) * torch.sin(wy)).unsqueeze(1)
        # Normalisation is affine per channel, so it is folded into the colours and the clamp bounds.
        mean, std = self._mean.view(1, 3, 1, 1), self._std.view(1, 3, 1, 1)
        if not normalise:
            mean, std = torch.zeros_like(mean), torch.ones_like(std)
        background = torch.addcmul((rgb(BG) - mean) / std, gradient, rgb(GRAD_RGB) / std)
        background.addcmul_(wave, rgb(WAVE_RGB) / std)
        images = torch.where(inside.unsqueeze(1), (rgb(FG) - mean) / std, background)
        images.clamp_((0.0 - mean) / std, (1.0 - mean) / std)
        masks = inside.long() * (labels + 1).view(-1, 1, 1)
        return Batch(images, labels, masks, self._captions(split, rows, labels_cpu))

    def _captions(self, split: str, rows: Tensor, labels_cpu: Tensor) -> list[str]:
        return captions(self._cpu_params[split][rows], labels_cpu)

    def reference_batches(self, count: int, batch_size: int) -> Iterator[Batch]:
        n = min(count, len(self._splits["train"][2]))
        for start in range(0, n, batch_size):
            yield self._render("train", torch.arange(start, min(start + batch_size, n)), size=self.img_size)

    def train_batches(self, start_step: int, batch_size: int) -> Iterator[Batch]:
        repeats = self.plan.repeats if self.plan is not None else 1
        for step in count(start_step):
            keys = share_keys(
                self._order, self.seed, step, batch_size, repeats=repeats, rank=self.rank, world_size=self.world_size
            )
            rows = torch.tensor([index for index, _ in keys])
            batch = self._render("train", rows, size=self.img_size)
            if self.tokenize is not None:
                batch.tokens = self._to_device(self._caption_tokens(rows.tolist(), batch.captions or []))
            yield batch if self.plan is None else self._crops(batch, keys)

    def _caption_tokens(self, rows: list[int], captions: list[str]) -> Tensor:
        """Tokens of the training captions, each image's made once (a caption is a function of its image)."""
        missing = [(r, c) for r, c in zip(rows, captions) if r not in self._tokens]
        if missing and self.tokenize is not None:
            for (r, _), tokens in zip(missing, self.tokenize([c for _, c in missing])):
                self._tokens[r] = tokens
        return torch.stack([self._tokens[r] for r in rows])

    def _crops(self, batch: Batch, keys: list) -> Batch:
        """The plan's crops of the rendered images, one set per output position (crops.py)."""
        import numpy as np

        from .collate import uniforms_for
        from .crops import UNIFORMS_PER_CROP, crop_boxes, cut_same_size

        assert self.plan is not None
        counts = [len(seeds) for _, seeds in keys]
        owners = np.repeat(np.arange(len(keys)), counts)
        uniforms = np.concatenate([uniforms_for(self.plan, seeds) for _, seeds in keys])
        size = np.full(len(owners), self.img_size)
        views, column = [], 0
        for group in self.plan.groups:
            u = uniforms[:, column : column + group.copies].transpose(1, 0, 2).reshape(-1, UNIFORMS_PER_CROP)
            boxes, flips = crop_boxes(u, np.tile(size, group.copies), np.tile(size, group.copies), group.scale, group.ratio)
            views.append(cut_same_size(batch.images, np.tile(owners, group.copies), boxes, flips, group.size))
            column += group.copies
        at = self._to_device(torch.from_numpy(owners))
        captions = None if batch.captions is None else [batch.captions[i] for i in owners.tolist()]
        tokens = None if batch.tokens is None else batch.tokens[at]
        return Batch(views[0], batch.labels[at], None, captions, tokens, tuple(views))

    def val_batches(self, batch_size: int) -> Iterator[Batch]:
        n = len(self._splits["val"][2])
        for start in range(0, n, batch_size):
            yield self._render("val", torch.arange(start, min(start + batch_size, n)), size=self.img_size)

    def probe_batch(self, size: int) -> Batch:
        n = len(self._splits["val"][2])
        if size > n:
            raise ValueError(
                f"probe batch of {size} images is larger than the shapes val split ({n}): raise data.val_size"
            )
        return self._render("val", torch.arange(size), size=self.img_size)

    def val_images(self, start: int, count: int, *, normalise: bool = True) -> Batch:
        """Validation images start .. start + count - 1; normalise=False gives plain 0..1 RGB, for a
        pretrained model that brings its own input normalisation (orchestrator/inspect)."""
        n = len(self._splits["val"][2])
        if start + count > n:
            raise ValueError(f"{start + count} val images asked of a shapes val split of {n}: raise val_size")
        return self._render("val", torch.arange(start, start + count), size=self.img_size, normalise=normalise)
