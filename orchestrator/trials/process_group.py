"""The process-group backend of a multi-worker trial, chosen from what the workers can use.

Ray Train's TorchTrainer picks NCCL whenever the workers ask for a GPU (`use_gpu`), from the
resource request alone. A GPU in Ray is a resource label: on Ray's fake multi-node autoscaler,
or a node started with `--num-gpus` but no driver, no CUDA device stands behind it, and NCCL
fails at `init_process_group` ("ProcessGroupNCCL is only supported with GPUs, no GPUs found").
`DeviceTorchConfig` asks the started workers instead: NCCL when every worker sees CUDA, gloo
otherwise; `worker_device` is the matching device (the GPU Ray assigned, else the CPU).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from ray.train.torch import TorchConfig
from ray.train.torch.config import _TorchBackend

AUTO = "auto"  # TorchTrainer only fills in a backend when it is empty: a marker it leaves alone


def cuda_available() -> bool:
    return torch.cuda.is_available()


class DeviceFollowingBackend(_TorchBackend):
    """Ray's torch backend (process group set-up and tear-down), told the backend the workers can use."""

    def on_start(self, worker_group: Any, backend_config: TorchConfig) -> None:
        if backend_config.backend == AUTO:
            every_worker_has_cuda = all(worker_group.execute(cuda_available))
            backend = "nccl" if every_worker_has_cuda else "gloo"
            backend_config = dataclasses.replace(backend_config, backend=backend)
        super().on_start(worker_group, backend_config)


@dataclasses.dataclass
class DeviceTorchConfig(TorchConfig):
    backend: str | None = AUTO

    @property
    def backend_cls(self) -> type[_TorchBackend]:
        return DeviceFollowingBackend


def worker_device() -> torch.device:
    """This rank's device: the GPU Ray assigned it when CUDA is there, else the CPU."""
    import ray.train.torch

    return ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")
