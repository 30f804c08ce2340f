"""Pretrained ViTs for the probes: timm names with a pretrained tag, local weight files, and
the final checkpoint of one of our own trials. Pure PyTorch + timm: no Ray, no MLflow.

Every timm source takes one loading path, the one timm itself takes for a hub name once
its weights are a local file:

    timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=PATH))

so a hub name is first turned into a file (the Hugging Face cache, else a download), and a
local file is used as it is. timm then applies the model's own checkpoint filter (DINOv2's
and OpenCLIP's original key layouts, position-embedding resampling to another image size).

Without a network, a hub name must fail in seconds, not after huggingface_hub's five
retries (about 25 s): `hub_weights` looks in the cache first, honours HF_HUB_OFFLINE, and
probes the hub's host with one short TCP connect before it asks huggingface_hub to download.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from timm.models.vision_transformer import VisionTransformer

from trainers.checkpoint import CheckpointError, load_checkpoint
from trainers.config import TrainConfig
from trainers.model import build_model

CONNECT_TIMEOUT_S = 3.0
HF_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm asks the hub for, safetensors first
VIT_MODULES = ("vision_transformer", "deit")  # timm modules whose models are VisionTransformer (DeiT-III is in deit)
OPEN_CLIP_FILES = {"open_clip_pytorch_model.bin": "open_clip_model.safetensors"}


class WeightsError(RuntimeError):
    """A model or its weights cannot be had; the message is one line that says what to do."""


@dataclass
class PretrainedModel:
    model: VisionTransformer
    name: str  # timm name with its tag (the architecture and pretrained config used)
    weights: Path  # the local file the weights came from
    mean: tuple[float, float, float]  # input normalisation the weights expect
    std: tuple[float, float, float]
    img_size: int

    @property
    def num_registers(self) -> int:
        return int(self.model.num_reg_tokens)


def split_name(name: str) -> tuple[str, str]:
    """'vit_small_patch14_dinov2.lvd142m' -> ('vit_small_patch14_dinov2', 'lvd142m'); no tag -> ''."""
    arch, _, tag = name.partition(".")
    return arch, tag


def check_architecture(name: str) -> None:
    """Raise WeightsError unless `name` is a timm VisionTransformer with that pretrained tag."""
    import timm
    from timm.models import get_pretrained_cfg, model_entrypoint

    arch, tag = split_name(name)
    if not timm.is_model(arch):
        raise WeightsError(f"{name}: not a timm model name (see timm.list_models('vit_*'))")
    module = model_entrypoint(arch).__module__.rsplit(".", 1)[-1]
    if module not in VIT_MODULES:
        raise WeightsError(f"{name}: the probes need a timm VisionTransformer; {arch} comes from timm.models.{module}")
    if tag:
        try:
            known = get_pretrained_cfg(name) is not None
        except RuntimeError:  # timm raises for a tag it does not know
            known = False
        if not known:
            tags = ", ".join(timm.list_pretrained(f"{arch}.*")) or "none"
            raise WeightsError(f"{name}: timm has no pretrained tag {tag!r} for {arch} (known: {tags})")


def _hub_files(cfg: Any) -> list[str]:
    if cfg.hf_hub_filename:
        safe = OPEN_CLIP_FILES.get(cfg.hf_hub_filename)
        return [safe, cfg.hf_hub_filename] if safe else [cfg.hf_hub_filename]
    return list(HF_FILES)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def host_reachable(url: str, timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """One TCP connect to the URL's host: an unresolvable name or a refused port fails at once."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def local_hint(name: str, files: list[str]) -> str:
    return f"download {files[0]} on a machine with a network and pass it as {name}=/path/to/{files[0]}"


def hub_weights(name: str) -> Path:
    """A local file with the pretrained weights of `name` (timm name with tag): from the
    Hugging Face cache, else downloaded. Raises WeightsError (one line) when that cannot be."""
    from timm.models import get_pretrained_cfg

    check_architecture(name)
    cfg = get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise WeightsError(f"{name}: timm knows no pretrained weights for it; pass a local file as {name}=/path/to/weights")
    if cfg.hf_hub_id:
        return _from_hf(name, cfg.hf_hub_id, _hub_files(cfg))
    return _from_url(name, cfg.url)


def _from_hf(name: str, repo: str, files: list[str]) -> Path:
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    repo_id, _, revision = repo.partition("@")
    for filename in files:
        cached = try_to_load_from_cache(repo_id, filename, revision=revision or None)
        if isinstance(cached, str):
            return Path(cached)
    if _offline() or not host_reachable(constants.ENDPOINT):
        why = "HF_HUB_OFFLINE is set" if _offline() else f"{constants.ENDPOINT} cannot be reached"
        raise WeightsError(f"{name}: weights are not in the local Hugging Face cache and {why}; {local_hint(name, files)}")
    for filename in files:
        try:
            return Path(hf_hub_download(repo_id, filename, revision=revision or None))
        except LocalEntryNotFoundError as exc:  # the connection dropped after the probe
            raise WeightsError(f"{name}: download from {repo_id} failed; {local_hint(name, files)}") from exc
        except EntryNotFoundError:
            continue
    raise WeightsError(f"{name}: {repo_id} has none of {', '.join(files)}; {local_hint(name, files)}")


def _from_url(name: str, url: str) -> Path:
    from torch.hub import download_url_to_file, get_dir

    target = Path(get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
    if target.is_file():
        return target
    files = [target.name]
    if not host_reachable(url):
        raise WeightsError(f"{name}: weights are not in the torch hub cache and {url} cannot be reached; {local_hint(name, files)}")
    target.parent.mkdir(parents=True, exist_ok=True)
    download_url_to_file(url, str(target), progress=False)
    return target


def load_timm(name: str, weights: Path, *, img_size: int | None = None, device: torch.device | str = "cpu") -> PretrainedModel:
    """Build timm model `name` (architecture, optional pretrained tag) with the weights in the
    local file `weights` (timm or original state dict, .safetensors, .pth/.bin, or big_vision .npz),
    through the same create_model call a hub name takes. img_size: another input size
    (position embeddings are resampled by timm's checkpoint filter)."""
    import timm

    check_architecture(name)
    weights = Path(weights)
    if not weights.is_file():
        raise WeightsError(f"{name}: no weights file at {weights}")
    overlay = {"file": str(weights), "custom_load": weights.suffix == ".npz"}  # .npz: big_vision's loader
    kwargs = {"img_size": img_size} if img_size else {}
    try:
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except (RuntimeError, KeyError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise WeightsError(f"{name}: cannot load {weights}: {first[:300]}") from exc
    if not isinstance(model, VisionTransformer):
        raise WeightsError(f"{name}: the probes need a timm VisionTransformer, got {type(model).__name__}")
    cfg = model.pretrained_cfg
    size = img_size or int(cfg["input_size"][-1])
    return PretrainedModel(
        model.eval().to(device), name, weights, tuple(cfg["mean"]), tuple(cfg["std"]), size  # type: ignore[arg-type]
    )


@dataclass
class TrialModel:
    model: VisionTransformer
    config: TrainConfig
    step: int


def load_trial_checkpoint(path: Path, device: torch.device | str = "cpu") -> TrialModel:
    """The model of one of our trials from its trainer_state.pt (trainers/loop.py's format:
    "model" state dict, "config" TrainConfig dump, "step")."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"no trial checkpoint at {path}")
    try:  # never unpickles code (trainers/checkpoint.py): tensors and plain values only
        state = load_checkpoint(path, map_location="cpu")
    except CheckpointError as exc:
        raise WeightsError(str(exc)) from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise WeightsError(f"{path} is not a trainer checkpoint (needs 'model' and 'config')")
    cfg = TrainConfig.model_validate(state["config"])
    num_classes = int(state["model"]["head.weight"].shape[0]) if "head.weight" in state["model"] else 0
    model = build_model(cfg.model, num_classes)
    model.load_state_dict(state["model"])
    return TrialModel(model.eval().to(device), cfg, int(state.get("step", cfg.steps)))
