"""The device-decode path's crop + resize: one image at a time against one batched op.

    python -m orchestrator.bench.crops [--images 256] [--width 500] [--height 375] [--size 224]
                                       [--device cpu|cuda] [--repeat 5] [--json]

per_image  what the GPU decode path did before: for each decoded image, draw its
           RandomResizedCrop box with a torch generator (torchvision's get_params, several
           small ops and .item() calls), slice it, antialiased bilinear interpolate, flip: a
           handful of dispatches per image (about 120 us each on a GPU, mostly launch and
           Python, whatever the image size).
batched    now: every box drawn at once on the host from the positions' uniforms
           (crops.crop_boxes), the images packed into one atlas, one roi_align for all crops
           (crops.cut_crops): a number of dispatches that does not grow with the batch, except
           one copy per image into the atlas.

On a CPU the per-image dispatch cost is small beside the arithmetic of large images, so run it
twice: small images (dispatch-bound, as on a GPU) and ImageNet-sized ones (arithmetic-bound).
Timings are medians of --repeat runs, after one warmup run.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from orchestrator.bench.devices import bench_device, device_name, synchronize


def old_box(height: int, width: int, generator: torch.Generator) -> tuple[int, int, int, int]:
    """The per-image box draw the GPU path used (torchvision's RandomResizedCrop.get_params)."""
    area = height * width
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    for _ in range(10):
        target = area * torch.empty(1).uniform_(0.08, 1.0, generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator).item())
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator).item())
            return top, left, h, w
    return 0, 0, height, width


def per_image(images: list[torch.Tensor], seeds: list[int], size: int) -> torch.Tensor:
    out = []
    for image, seed in zip(images, seeds):
        generator = torch.Generator().manual_seed(seed)
        top, left, h, w = old_box(image.shape[-2], image.shape[-1], generator)
        part = image[:, top : top + h, left : left + w].unsqueeze(0).float()
        crop = F.interpolate(part, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        crop = crop.round_().clamp_(0, 255).to(torch.uint8)[0]
        out.append(crop.flip(-1) if torch.rand(1, generator=generator).item() < 0.5 else crop)
    return torch.stack(out)


def batched(images: list[torch.Tensor], seeds: list[int], size: int) -> torch.Tensor:
    from trainers.data.crops import crop_boxes, cut_crops, draw_uniforms

    uniforms = np.concatenate([draw_uniforms(s, 1) for s in seeds])
    heights = np.array([im.shape[-2] for im in images])
    widths = np.array([im.shape[-1] for im in images])
    boxes, flips = crop_boxes(uniforms, heights, widths, (0.08, 1.0))
    return cut_crops(images, list(range(len(images))), boxes, flips, size)


def decoded_images(count: int, width: int, height: int, device: torch.device) -> list[torch.Tensor]:
    """uint8 images of varied sizes around width x height (as a decoder hands them over)."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        h = max(8, int(height * rng.uniform(0.8, 1.2)))
        w = max(8, int(width * rng.uniform(0.8, 1.2)))
        coarse = torch.from_numpy(rng.integers(0, 256, size=(1, 3, max(2, h // 16), max(2, w // 16)), dtype=np.uint8))
        out.append(F.interpolate(coarse.float(), size=(h, w), mode="bilinear").to(torch.uint8)[0].to(device))
    return out


def time_it(fn: Any, repeat: int, device: torch.device) -> float:
    fn()
    synchronize(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_crop_bench(images: int, width: int, height: int, size: int, device: torch.device, repeat: int) -> dict[str, Any]:
    pictures = decoded_images(images, width, height, device)
    seeds = list(range(1000, 1000 + images))
    old_s = time_it(lambda: per_image(pictures, seeds, size), repeat, device)
    new_s = time_it(lambda: batched(pictures, seeds, size), repeat, device)
    return {
        "benchmark": "crops", "device": device_name(device), "images": images, "width": width, "height": height,
        "size": size, "per_image_us": old_s / images * 1e6, "batched_us": new_s / images * 1e6, "speedup": old_s / new_s,
    }


def format_crop_result(r: dict[str, Any]) -> str:
    return "\n".join([
        f"device      {r['device']}",
        f"images      {r['images']} of about {r['width']}x{r['height']} -> {r['size']}x{r['size']} random resized crops",
        f"per_image   {r['per_image_us']:10.1f} us/image   (box draw, crop, resize, flip, one image at a time)",
        f"batched     {r['batched_us']:10.1f} us/image   (host boxes, atlas, one roi_align)",
        f"speedup     {r['speedup']:10.2f}x",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.bench.crops", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--device", help="cpu or cuda[:i] (default: cuda if there is one)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: as a DataLoader worker)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = run_crop_bench(args.images, args.width, args.height, args.size, bench_device(args.device), args.repeat)
    print(format_crop_result(result))
    if args.json:
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
