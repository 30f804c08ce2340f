"""DeiT-III's 3-Augment on batched image tensors on the device.

3-Augment (Touvron et al. 2022, facebookresearch/deit augment.py `new_data_aug_generator`):
RandomResizedCrop (scale 0.08-1) + horizontal flip, then one of grayscale / solarize /
Gaussian blur (sigma 0.1-2), then ColorJitter (brightness, contrast, saturation).
The crop and the flip are the loader's (trainers/data/crops.py: from the whole decoded image,
as DeiT's dataset transform; repeated augmentation there too, each repeat its own crop).
This module does the rest, on the device. Every image gets its own draws, made on the host
for the whole global batch of the step from a generator seeded by (seed, step); a rank
applies the rows of its share. So the augmented batch of step s is a pure function of
(seed, s) and of the images, the same for any number of ranks, and a resumed trial sees the
same batch. It runs in float32 with autocast off, whatever the trainer's precision.

Departures from the PIL reference, all small: ColorJitter applies brightness, contrast and
saturation in that fixed order (torchvision shuffles the order per call); blur uses a 13-tap
kernel (3 sigma at sigma 2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainers.data.sampling import derive_seed

Tensor = torch.Tensor
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
BLUR_SIGMA = (0.1, 2.0)
BLUR_TAPS = 13


def step_generator(seed: int, step: int, tag: str) -> torch.Generator:
    """A CPU generator for one step's random draws: a pure function of (seed, step, tag)."""
    return torch.Generator().manual_seed(derive_seed(seed, tag, step))


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """Host-drawn parameters onto the device without a host sync (pinned, non-blocking on CUDA)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _uniform(gen: torch.Generator, low: float, high: float, *shape: int) -> Tensor:
    return low + (high - low) * torch.rand(*shape, generator=gen)


def grayscale(images: Tensor) -> Tensor:
    weights = images.new_tensor(GRAY_WEIGHTS).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


def gaussian_blur(images: Tensor, sigma: Tensor) -> Tensor:
    """Separable blur, one sigma per image (reflect padding, like torchvision)."""
    n, c, hh, ww = images.shape
    half = BLUR_TAPS // 2
    x = torch.arange(-half, half + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x.view(1, -1) / sigma.view(-1, 1)) ** 2)
    kernel = to_device(kernel / kernel.sum(dim=1, keepdim=True), images.device).to(images.dtype)
    kernel = kernel.repeat_interleave(c, dim=0)  # [n * c, taps]: one kernel per image channel
    flat = F.pad(images.reshape(1, n * c, hh, ww), (half, half, half, half), mode="reflect")
    flat = F.conv2d(flat, kernel.view(n * c, 1, 1, -1), groups=n * c)
    flat = F.conv2d(flat, kernel.view(n * c, 1, -1, 1), groups=n * c)
    return flat.view(n, c, hh, ww)


def color_jitter(images: Tensor, factors: Tensor) -> Tensor:
    """Brightness, contrast and saturation: factors [3, n] (each U(1 - strength, 1 + strength))."""
    n = images.shape[0]
    b, c, s = (f.view(n, 1, 1, 1) for f in to_device(factors, images.device))
    x = (images * b).clamp_(0, 1)
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    x = (c * x + (1 - c) * mean).clamp_(0, 1)
    return (s * x + (1 - s) * grayscale(x)).clamp_(0, 1)


@dataclass(frozen=True)
class ColourDraws:
    """3-Augment's per-image draws after the crop, for a global batch (host tensors)."""

    choice: Tensor  # int64 [n]: 0 grayscale, 1 solarize, 2 blur
    sigma: Tensor  # float32 [n]
    jitter: Tensor | None  # float32 [3, n] brightness, contrast, saturation factors

    @classmethod
    def draw(cls, n: int, jitter: float, gen: torch.Generator) -> "ColourDraws":
        choice = torch.randint(0, 3, (n,), generator=gen)
        sigma = _uniform(gen, *BLUR_SIGMA, n)
        factors = _uniform(gen, max(0.0, 1 - jitter), 1 + jitter, 3, n) if jitter > 0 else None
        return cls(choice, sigma, factors)

    def rows(self, part: slice) -> "ColourDraws":
        return ColourDraws(self.choice[part], self.sigma[part], None if self.jitter is None else self.jitter[:, part])


def colour_augment(images: Tensor, draws: ColourDraws) -> Tensor:
    """One of grayscale / solarize / blur per image, then colour jitter: 0..1 RGB [n, 3, H, W], fp32."""
    x = images
    out = x.clone()
    for kind in range(3):
        rows_cpu = (draws.choice == kind).nonzero().squeeze(1)  # host-side draws: no device sync
        if rows_cpu.numel() == 0:
            continue
        rows = to_device(rows_cpu, x.device)
        part = x[rows]
        if kind == 0:
            part = grayscale(part).expand(-1, 3, -1, -1)
        elif kind == 1:
            part = torch.where(part >= 0.5, 1.0 - part, part)  # PIL's solarize at 128 of 255
        else:
            part = gaussian_blur(part, draws.sigma[rows_cpu])
        out[rows] = part
    return out if draws.jitter is None else color_jitter(out, draws.jitter)


class BatchAugment:
    """3-Augment after the loader's crop, on a rank's share of a normalised training batch.

    mean, std: the per-channel normalisation the data source applied; 3-Augment works on
    0..1 pixels, so the batch is taken back there and normalised again afterwards.
    global_batch: the positions of a step's global batch; the draws cover all of them.
    """

    def __init__(self, *, seed: int, mean: Tensor, std: Tensor, jitter: float, global_batch: int) -> None:
        self.seed, self.jitter, self.global_batch = seed, jitter, global_batch
        self.mean, self.std = mean.view(1, 3, 1, 1).float(), std.view(1, 3, 1, 1).float()

    def draws(self, step: int) -> ColourDraws:
        return ColourDraws.draw(self.global_batch, self.jitter, step_generator(self.seed, step, "three_augment"))

    def __call__(self, images: Tensor, step: int, share: tuple[int, int] = (0, 1)) -> Tensor:
        rank, ranks = share
        n = images.shape[0]
        if n * ranks != self.global_batch:
            raise ValueError(f"a share of {n} images is not 1/{ranks} of the global batch {self.global_batch}")
        draws = self.draws(step).rows(slice(rank * n, (rank + 1) * n))
        # fp32 with autocast off: under bf16 autocast the blur's conv would write bf16 into the fp32 batch.
        with torch.autocast(images.device.type, enabled=False):
            pixels = (images.float() * self.std + self.mean).clamp_(0, 1)
            return (colour_augment(pixels, draws) - self.mean) / self.std
