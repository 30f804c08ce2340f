"""The arithmetic of a ViT's cost, without torch.

The sweep driver prints every trial's FLOPs in its plan; importing torch and timm for
that would add seconds to every launch, so the formulas live here, apart from the model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from trainers.config import ClipConfig, DinoConfig, ModelConfig, TrainConfig


def forward_macs_per_image(cfg: ModelConfig, num_classes: int) -> int:
    """Multiply-accumulates of one forward pass, counting registers in the token count of the
    blocks they pass through.

    Per block with T tokens of width D and MLP ratio r: QKV and output projections
    4*T*D^2, MLP 2*r*T*D^2, attention scores and weighted sum 2*T^2*D. Patch embedding
    and the head are added; norms, softmax and GELU are ignored (under 1%).
    """
    dim, depth, _ = cfg.dims

    def per_block(tokens: int) -> float:
        return (4 + 2 * cfg.mlp_ratio) * tokens * dim * dim + 2 * tokens * tokens * dim

    # Late registers (register_depth k) are absent from the first k blocks.
    early = cfg.register_depth
    blocks = early * per_block(cfg.num_patches + 1) + (depth - early) * per_block(cfg.num_patches + 1 + cfg.num_registers)
    patch_embed = cfg.num_patches * 3 * cfg.patch_size**2 * dim
    head = dim * num_classes
    return int(blocks + patch_embed + head)


def train_flops_per_image(cfg: ModelConfig, num_classes: int) -> int:
    """Training FLOPs per image: forward 2 FLOPs per MAC, backward twice the forward."""
    return 6 * forward_macs_per_image(cfg, num_classes)


def dino_head_macs(in_dim: int, d: DinoConfig) -> int:
    """One token through the DINO head: 3-layer MLP to the bottleneck, then the prototypes."""
    hidden = d.head_hidden_dim
    return in_dim * hidden + hidden * hidden + hidden * d.head_bottleneck_dim + d.head_bottleneck_dim * d.head_prototypes


def text_forward_macs(c: ClipConfig) -> int:
    """One caption through open_clip's text transformer (MLP ratio 4) and its projection."""
    length, width = c.context_length, c.text_width
    per_block = (4 + 2 * 4) * length * width * width + 2 * length * length * width
    return c.text_layers * per_block + width * c.embed_dim


def objective_train_flops_per_image(cfg: TrainConfig, num_classes: int) -> int:
    """Training FLOPs per image of the batch, with every extra pass the objective makes.

    supervised: one forward and backward. dino: the student's forward and backward on 2
    global crops and N local crops (at their own token count) with the DINO head on each
    [CLS] and on the expected number of iBOT-masked patches, plus the teacher's forward
    (2 FLOPs per MAC, no backward) on the 2 global crops. clip: forward and backward of the
    image tower and its projection and of the text tower, once per image-caption pair.
    """
    model = cfg.model
    if cfg.objective == "supervised":
        return train_flops_per_image(model, num_classes)
    dim = model.dims[0]
    backbone = forward_macs_per_image(model, 0)
    if cfg.objective == "clip":
        return 6 * (backbone + dim * cfg.clip.embed_dim + text_forward_macs(cfg.clip))
    d = cfg.dino
    head = dino_head_macs(dim, d)
    masked = d.ibot_mask_probability * sum(d.ibot_mask_ratio) / 2 * model.num_patches if d.ibot_weight > 0 else 0.0
    global_crop = backbone + head * (1 + masked)
    local = model.model_copy(update={"img_size": d.local_crop_size})
    student = 2 * global_crop + d.local_crops * (forward_macs_per_image(local, 0) + head)
    teacher = 2 * global_crop
    return int(6 * student + 2 * teacher)


# ----------------------------------------------------------------------------- time and money

@dataclass(frozen=True)
class GpuType:
    peak_tflops: float  # bf16 dense tensor-core peak
    memory_gb: float  # device memory as sold (GB = 1e9 bytes)
    usd_per_hour: float  # rough on-demand cloud list price: a default only; set cost.usd_per_gpu_hour


# From the vendors' data sheets, without the 2:4-sparsity doubling they headline: H100 SXM 1979
# sparse -> 989 (H200 has the same tensor cores), H100 NVL 1671 -> 835 (94 GB), H100 PCIe 1513
# -> 756, H200 NVL 1671 -> 835, A100 312, L40S 733 -> 362, L4 242 -> 121, A10 250 -> 125 (AWS's
# A10G is an A10 variant; NVIDIA publishes no separate sheet, so its real clocks may give less:
# lower mfu if measured). "A100" is the 40 GB part (AWS p4d, GCP a2-highgpu), the safe side for
# the memory check; "A100 80GB" is the p4de / a2-ultragpu part.
GPU_TYPES: dict[str, GpuType] = {
    "H100": GpuType(989.0, 80, 4.0),
    "H100 NVL": GpuType(835.0, 94, 4.0),
    "H100 PCIe": GpuType(756.0, 80, 3.5),
    "H200": GpuType(989.0, 141, 5.0),
    "H200 NVL": GpuType(835.0, 141, 5.0),
    "A100": GpuType(312.0, 40, 2.5),
    "A100 80GB": GpuType(312.0, 80, 3.0),
    "L40S": GpuType(362.0, 48, 1.9),
    "L4": GpuType(121.0, 24, 0.8),
    "A10G": GpuType(125.0, 24, 1.0),
    "A10": GpuType(125.0, 24, 1.0),
}
GPU_PEAK_TFLOPS: dict[str, float] = {name: gpu.peak_tflops for name, gpu in GPU_TYPES.items()}
GPU_USD_PER_HOUR: dict[str, float] = {name: gpu.usd_per_hour for name, gpu in GPU_TYPES.items()}
GPU_MEMORY_GB: dict[str, float] = {name: gpu.memory_gb for name, gpu in GPU_TYPES.items()}


def match_gpu_name(device_name: str) -> str | None:
    """The table's GPU type for a device name such as torch.cuda.get_device_name() gives
    ('NVIDIA H100 NVL' -> 'H100 NVL', 'NVIDIA A100-SXM4-40GB' -> 'A100'), or None.

    A type matches when its words occur in the name as whole words (so 'L4' is not 'L40S'
    and 'A10' is not 'A100'); of several matches the longest name wins ('H100 NVL' over 'H100')."""
    matches = [
        name for name in GPU_TYPES
        if re.search(r"(?<![A-Za-z0-9])" + r"[\s_-]+".join(map(re.escape, name.split())) + r"(?![A-Za-z0-9])", device_name, re.I)
    ]
    # 'A100 80GB' is the 40 GB row's 80 GB part: its name as the driver spells it ('A100-SXM4-80GB').
    if "A100" in matches and re.search(r"80\s*GB", device_name, re.I):
        matches.append("A100 80GB")
    return max(matches, key=len, default=None)


DEFAULT_GPU = "H100"
# Model FLOPs utilisation the FLOPs estimate assumes where nothing is measured (DESIGN.md: 30-40%
# is what ViT training reaches with bf16 and fused attention).
DEFAULT_MFU = 0.4
# Trainer images/s per GPU measured by `python -m orchestrator.bench` (docs/performance.md):
# (gpu type, model label, img_size, num_registers, objective) -> images/s. None measured on a
# GPU yet, so every estimate comes from FLOPs at the stated MFU.
MEASURED_IMAGES_PER_S: dict[tuple[str, str, int, int, str], float] = {}


def gpu_seconds(cfg: TrainConfig, flops: float, gpu_type: str, mfu: float, peak_tflops: float | None = None) -> tuple[float, str]:
    """(GPU-seconds of a trial of `flops` training FLOPs, how they were estimated).

    A measured throughput for the GPU type, model, size, registers and objective wins; else
    FLOPs / (peak * mfu). GPU-seconds do not depend on how many GPUs share the trial (data
    parallel at the same per-GPU throughput): its wall time is GPU-seconds / GPUs."""
    key = (gpu_type, cfg.model.label, cfg.model.img_size, cfg.model.num_registers, cfg.objective)
    measured = MEASURED_IMAGES_PER_S.get(key)
    if measured is not None:
        return cfg.steps * cfg.optim.batch_size / measured, f"measured {measured:.0f} images/s"
    peak = peak_tflops if peak_tflops is not None else GPU_PEAK_TFLOPS[gpu_type]
    return flops / (peak * 1e12 * mfu), f"FLOPs at {mfu:.0%} MFU of {peak:g} TFLOP/s"
