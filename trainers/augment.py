"""DeiT-III's 3-Augment on batched image tensors on the device, and repeated augmentation.

3-Augment (Touvron et al. 2022, facebookresearch/deit augment.py `new_data_aug_generator`):
RandomResizedCrop (scale 0.08-1, bicubic) + horizontal flip, then one of grayscale /
solarize / Gaussian blur (sigma 0.1-2), then ColorJitter (brightness, contrast, saturation).
torchvision's v2 transforms draw one set of parameters per call, i.e. per batch; here every
image gets its own, drawn on the host from a generator seeded by (seed, step), so the
augmented batch of step s is a pure function of (seed, s) and of the images, and a resumed
trial sees the same batch. The crop of a whole batch is one `grid_sample` (bicubic) with a
per-image affine grid; the other operations are per-image broadcasts.

Departures from the PIL reference, all small: the crop is not antialiased when it shrinks;
ColorJitter applies brightness, contrast and saturation in that fixed order (torchvision
shuffles the order per call); blur uses a 13-tap kernel (3 sigma at sigma 2).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from trainers.data.sampling import derive_seed

Tensor = torch.Tensor
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
BLUR_SIGMA = (0.1, 2.0)
BLUR_TAPS = 13
CROP_TRIES = 10  # torchvision's RandomResizedCrop tries 10 boxes, then falls back


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


def crop_boxes(n: int, aspect: float, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(width, height, centre x, centre y) per image, as fractions of the source image.

    aspect = source width / height. Like torchvision: area U(scale), log-ratio uniform, the first
    of CROP_TRIES boxes that fits; else the whole image."""
    area = _uniform(gen, *CROP_SCALE, n, CROP_TRIES)
    log_ratio = _uniform(gen, math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]), n, CROP_TRIES)
    ratio = log_ratio.exp()
    w = (area * ratio / aspect).sqrt()
    h = (area * aspect / ratio).sqrt()
    fits = (w <= 1) & (h <= 1)
    first = fits.float().argmax(dim=1, keepdim=True)  # 0 when nothing fits, then masked below
    any_fit = fits.any(dim=1)
    w = torch.where(any_fit, w.gather(1, first).squeeze(1), torch.ones(n))
    h = torch.where(any_fit, h.gather(1, first).squeeze(1), torch.ones(n))
    cx = w / 2 + (1 - w) * torch.rand(n, generator=gen)
    cy = h / 2 + (1 - h) * torch.rand(n, generator=gen)
    return w, h, cx, cy


def resized_crop_flip(images: Tensor, size: int, gen: torch.Generator) -> Tensor:
    """Per-image RandomResizedCrop (bicubic) to size x size and a horizontal flip with p=0.5."""
    n, _, height, width = images.shape
    w, h, cx, cy = crop_boxes(n, width / height, gen)
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = w * flip  # output x in [-1, 1] -> source x; a negative scale mirrors
    theta[:, 0, 2] = 2 * cx - 1
    theta[:, 1, 1] = h
    theta[:, 1, 2] = 2 * cy - 1
    grid = F.affine_grid(to_device(theta, images.device), [n, 3, size, size], align_corners=False)
    out = F.grid_sample(images, grid.to(images.dtype), mode="bicubic", padding_mode="border", align_corners=False)
    return out.clamp_(0.0, 1.0)  # bicubic overshoots


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


def color_jitter(images: Tensor, strength: float, gen: torch.Generator) -> Tensor:
    """Brightness, contrast and saturation factors U(1 - strength, 1 + strength) per image."""
    if strength <= 0:
        return images
    n = images.shape[0]
    factors = to_device(_uniform(gen, max(0.0, 1 - strength), 1 + strength, 3, n), images.device).to(images.dtype)
    b, c, s = (f.view(n, 1, 1, 1) for f in factors)
    x = (images * b).clamp_(0, 1)
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    x = (c * x + (1 - c) * mean).clamp_(0, 1)
    return (s * x + (1 - s) * grayscale(x)).clamp_(0, 1)


def three_augment(images: Tensor, size: int, gen: torch.Generator, jitter: float = 0.3) -> Tensor:
    """3-Augment of a batch of 0..1 RGB images [B, 3, H, W] -> [B, 3, size, size], per-image draws."""
    x = resized_crop_flip(images, size, gen)
    n = x.shape[0]
    choice = torch.randint(0, 3, (n,), generator=gen)  # 0 grayscale, 1 solarize, 2 blur
    sigma = _uniform(gen, *BLUR_SIGMA, n)
    out = x.clone()
    for kind in range(3):
        rows_cpu = (choice == kind).nonzero().squeeze(1)  # host-side draws: no device sync
        if rows_cpu.numel() == 0:
            continue
        rows = to_device(rows_cpu, x.device)
        part = x[rows]
        if kind == 0:
            part = grayscale(part).expand(-1, 3, -1, -1)
        elif kind == 1:
            part = torch.where(part >= 0.5, 1.0 - part, part)  # PIL's solarize at 128 of 255
        else:
            part = gaussian_blur(part, sigma[rows_cpu])
        out[rows] = part
    return color_jitter(out, jitter, gen)


class BatchAugment:
    """The device-side augmentation of a normalised training batch: repeats, then 3-Augment.

    mean, std: the per-channel normalisation the data source applied; 3-Augment works on
    0..1 pixels, so the batch is taken back there and normalised again afterwards.
    """

    def __init__(
        self, *, seed: int, size: int, mean: Tensor, std: Tensor, jitter: float, repeats: int, batch_size: int
    ) -> None:
        self.seed, self.size, self.jitter, self.repeats, self.batch_size = seed, size, jitter, repeats, batch_size
        self.mean, self.std = mean.view(1, 3, 1, 1), std.view(1, 3, 1, 1)

    def __call__(self, images: Tensor, labels: Tensor, step: int) -> tuple[Tensor, Tensor]:
        if self.repeats > 1:  # each image k times in a row, each copy with its own draws; the last may get fewer
            images = images.repeat_interleave(self.repeats, dim=0)[: self.batch_size]
            labels = labels.repeat_interleave(self.repeats, dim=0)[: self.batch_size]
        gen = step_generator(self.seed, step, "three_augment")
        pixels = (images.float() * self.std + self.mean).clamp_(0, 1)
        out = three_augment(pixels, self.size, gen, self.jitter)
        return (out - self.mean) / self.std, labels
