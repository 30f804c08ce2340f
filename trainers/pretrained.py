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
    note: str = ""  # one line on what was adapted to load the file (its classifier head), else empty

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


def error_summary(exc: BaseException, details: int = 2, limit: int = 600) -> str:
    """An exception's message on one line with its useful part: torch's load_state_dict error is
    a header line ('Error(s) in loading state_dict for VisionTransformer:') and the reasons on the
    lines below it, so the header alone says nothing. The header, the first `details` reasons,
    and how many more there are."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return exc.__class__.__name__
    text = "; ".join([lines[0].rstrip(":") + (":" if len(lines) > 1 else ""), *lines[1 : 1 + details]]).replace(":;", ":")
    if len(lines) > 1 + details:
        text += f" (and {len(lines) - 1 - details} more)"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _timm_state_dict_shapes(weights: Path) -> dict[str, tuple[int, ...]] | None:
    """Parameter shapes of a timm-layout state dict file (safetensors, or a torch file holding
    tensors only, perhaps under 'state_dict' or 'model'), without loading the tensors; None for
    other formats or a file that cannot be read this way (timm's own loader then says why)."""
    try:
        if weights.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(weights), framework="pt") as handle:
                return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        if weights.suffix == ".npz":
            return None
        state = torch.load(weights, map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # noqa: BLE001 - any unreadable file is timm's to report
        return None
    if isinstance(state, dict):
        for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict):
        return None
    return {key.removeprefix("module."): tuple(v.shape) for key, v in state.items() if isinstance(v, torch.Tensor)}


def head_adaptation(name: str, weights: Path) -> tuple[int, str] | None:
    """(num_classes, why) when the file's classifier head differs from the one timm's config for
    `name` builds: its class count, or 0 when the file has no head. None when they agree or the
    file is not a timm-layout state dict (an original DINOv2 or OpenCLIP layout: timm's filter reads it)."""
    from timm.models import get_pretrained_cfg

    shapes = _timm_state_dict_shapes(weights)
    if not shapes or not any(key.startswith("blocks.") for key in shapes):
        return None
    cfg = get_pretrained_cfg(name)
    default = int(cfg.num_classes) if cfg is not None and cfg.num_classes is not None else 1000
    head = shapes.get("head.weight")
    classes = int(head[0]) if head else 0
    if classes == default:
        return None
    what = f"a {classes}-class classifier head" if classes else "no classifier head"
    built = f"built with num_classes={classes}" if classes else "built without a head"
    return classes, f"{weights.name} has {what}, not the {default} classes of timm's {name}: {built} (the probes read the blocks, not the head)"


def load_timm(name: str, weights: Path, *, img_size: int | None = None, device: torch.device | str = "cpu") -> PretrainedModel:
    """Build timm model `name` (architecture, optional pretrained tag) with the weights in the
    local file `weights` (timm or original state dict, .safetensors, .pth/.bin, or big_vision .npz),
    through the same create_model call a hub name takes. img_size: another input size
    (position embeddings are resampled by timm's checkpoint filter). A file whose classifier
    head has another class count (fine-tuned on another data set), or none, loads with the head
    it has: the probes do not use it. PretrainedModel.note says so."""
    import timm

    check_architecture(name)
    weights = Path(weights)
    if not weights.is_file():
        raise WeightsError(f"{name}: no weights file at {weights}")
    overlay: dict[str, Any] = {"file": str(weights), "custom_load": weights.suffix == ".npz"}  # .npz: big_vision's loader
    kwargs: dict[str, Any] = {"img_size": img_size} if img_size else {}
    note = ""
    adapted = head_adaptation(name, weights)
    if adapted is not None:
        # The same class count in the model and its pretrained config: timm then loads strictly,
        # the file's head included (with different counts it would drop the head and load loosely).
        classes, note = adapted
        overlay["num_classes"] = kwargs["num_classes"] = classes
    try:
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except (RuntimeError, KeyError, ValueError, OSError) as exc:
        raise WeightsError(f"{name}: cannot load {weights}: {error_summary(exc)}") from exc
    if not isinstance(model, VisionTransformer):
        raise WeightsError(f"{name}: the probes need a timm VisionTransformer, got {type(model).__name__}")
    cfg = model.pretrained_cfg
    size = img_size or int(cfg["input_size"][-1])
    return PretrainedModel(
        model.eval().to(device), name, weights, tuple(cfg["mean"]), tuple(cfg["std"]), size, note  # type: ignore[arg-type]
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
