"""Image decoding for the loaders: torchcodec on the CPU and on CUDA, with a per-image fallback.

Why torchcodec (meta-pytorch/torchcodec, >= 0.17): torchvision's `decode_jpeg(device="cuda")`
is deprecated, and it decodes on a stream of its own without ordering the outputs with the
caller's stream (pytorch/vision PR 9606 measured corrupted images on an H100; the fix went
into torchcodec). torchcodec's `decode_jpeg(list, device="cuda")` decodes the whole list in
one nvJPEG call (hardware engine where the GPU has one, nvJPEG's GPU software path for
progressive JPEGs) and enqueues it on the caller's current CUDA stream (torchcodec's
src/torchcodec/_core/DecodeJpegCuda.cpp: `decode_jpegs_cuda` decodes on
`get_current_cuda_stream(device)`; its `decode_jpeg` docstring: "CUDA decoding uses nvJPEG
... prefer passing a batch"). We call it on the training thread's current stream, so the
crops and the training step that follow on that stream see complete images. Its CPU image decoders (libjpeg-turbo, libpng, libwebp,
bundled in the wheel) need no FFmpeg: a CPU-only machine imports and runs them.
NVIDIA DALI was the other candidate: its wheels are CUDA-only (nothing to run on the CPU
test machines) and its readers own the sample order and sharding, which would cost the
step-addressed reads that make resume exact.

What goes to the GPU: JPEGs that nvJPEG decodes (`nvjpeg_decodable`: baseline, extended or
progressive Huffman, 8 bits, 1 or 3 components). PNG, WebP, CMYK/YCCK JPEGs, 12-bit or
arithmetic-coded JPEGs are decoded on the CPU by the loader worker, image by image
(`decode_cpu`: torchcodec, then PIL). If the batched GPU call still fails, each image of that
batch is retried alone, and an image the GPU cannot decode goes to the CPU. An image no
decoder can read becomes a grey image with one warning naming it: one bad image never
fails the batch or the trial.
"""

from __future__ import annotations

import io
import warnings
from typing import Sequence

import torch

GREY = 128
_warned: set[str] = set()

# JPEG start-of-frame markers that nvJPEG decodes: baseline, extended and progressive Huffman.
_NVJPEG_SOF = (0xC0, 0xC1, 0xC2)
_OTHER_SOF = (0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)  # lossless, hierarchical, arithmetic


def image_format(data: bytes | memoryview) -> str:
    """'jpeg', 'png', 'webp', 'gif' or 'other', from the leading bytes."""
    head = bytes(data[:12])
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    return "other"


def jpeg_frame(data: bytes | memoryview) -> tuple[int, int, int] | None:
    """(SOF marker, bits per sample, components) of a JPEG, read from its headers; None if unreadable."""
    size, pos = len(data), 2
    while pos + 4 <= size:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        length = (data[pos + 2] << 8) | data[pos + 3]
        if marker in _NVJPEG_SOF or marker in _OTHER_SOF:
            if pos + 10 > size:
                return None
            return marker, data[pos + 4], data[pos + 9]
        if marker in (0xDA, 0xD9) or length < 2:  # start of scan before any frame header
            return None
        pos += 2 + length
    return None


def nvjpeg_decodable(data: bytes | memoryview) -> bool:
    """True for the JPEGs that go to the GPU decoder (see the module docstring)."""
    if image_format(data) != "jpeg":
        return False
    frame = jpeg_frame(data)
    return frame is not None and frame[0] in _NVJPEG_SOF and frame[1] == 8 and frame[2] in (1, 3)


def _warn_once(name: str, message: str) -> None:
    if name not in _warned:
        _warned.add(name)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def decode_cpu(data: torch.Tensor, name: str = "image") -> torch.Tensor:
    """uint8 [3, H, W] RGB from encoded bytes (1-D uint8 CPU tensor), on the CPU: torchcodec
    (JPEG, PNG, WebP, GIF; EXIF orientation applied), else PIL; else a grey image and a warning."""
    from torchcodec.decoders import decode_image

    try:
        image = decode_image(data, mode="RGB")
        if image.ndim == 3:
            return image
        return image[0]  # an animated WebP/GIF: its first frame
    except (RuntimeError, ValueError):
        pass
    try:
        from PIL import Image, ImageOps

        with Image.open(io.BytesIO(data.numpy().tobytes())) as picture:
            rgb = ImageOps.exif_transpose(picture).convert("RGB")
            return torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(rgb.height, rgb.width, 3).permute(2, 0, 1).contiguous()
    except Exception as err:  # noqa: BLE001 - any unreadable image: substitute, warn, go on
        _warn_once(name, f"cannot decode {name} ({type(err).__name__}: {err}); training on a grey image in its place")
        return torch.full((3, 64, 64), GREY, dtype=torch.uint8)


def decode_on_device(data: Sequence[torch.Tensor], device: torch.device, names: Sequence[str] | None = None) -> list[torch.Tensor]:
    """uint8 [3, H, W] images on `device` from JPEG bytes that `nvjpeg_decodable` accepted.

    One torchcodec `decode_jpeg(list, device=device)` call for the whole list (CUDA: nvJPEG on
    the current stream; the CPU tests run the same call with device='cpu'). If it fails, image by
    image, and the CPU decoder (decode_cpu) for an image the device decoder rejects."""
    from torchcodec.decoders import decode_jpeg

    try:
        return list(decode_jpeg(list(data), mode="RGB", device=device))
    except RuntimeError:
        names = names or [f"image {i}" for i in range(len(data))]
        out = []
        for d, n in zip(data, names):
            try:
                out.append(decode_jpeg(d, mode="RGB", device=device))
            except RuntimeError as err:
                _warn_once("device:" + n, f"the {device.type} JPEG decoder rejected {n} ({str(err)[:200]}); decoding it on the CPU")
                out.append(decode_cpu(d, n).to(device, non_blocking=True))
        return out
