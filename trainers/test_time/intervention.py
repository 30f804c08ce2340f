"""The test-time register: one extra token that takes over the register neurons' activations.

One zero token is added to the prefix, and in each chosen unit the value of largest
magnitude over the patches (the maximum, for units that fire positively) is written into
that token while the patches get zero. Inside the context the model reports one more
register, so the probes measure it like a trained one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

import torch
from timm.models.vision_transformer import VisionTransformer

from trainers.late_registers import prefix_tokens_at
from trainers.probes.capture import unwrap
from trainers.test_time.search import NeuronSearch, RegisterNeuron


def _signed_max(values: torch.Tensor, dim: int) -> torch.Tensor:
    """The entry of largest magnitude along `dim`, sign kept (the maximum for units that fire positively)."""
    high, low = values.amax(dim), values.amin(dim)
    return torch.where(high.abs() >= low.abs(), high, low)


@contextlib.contextmanager
def test_time_register(
    model: torch.nn.Module, neurons: NeuronSearch | Iterable[RegisterNeuron | tuple[int, int]]
) -> Iterator[VisionTransformer]:
    """Inside the context `model` runs with one test-time register (see the module docstring).

    The token is zero when it enters (before `norm_pre`, as in the authors' OpenCLIP code) and
    sits after [CLS] and any trained registers; `num_prefix_tokens` and `num_reg_tokens` count
    it. Late registers (`model.register_depth` k) enter before block k right after [CLS], so in
    the blocks before k the token sits right after [CLS], and from block k on after them.
    Hooks and counts are removed on exit, leaving the model as it was.
    """
    vit = unwrap(model)
    chosen = neurons.neurons if isinstance(neurons, NeuronSearch) else list(neurons)
    by_layer: dict[int, list[int]] = {}
    for n in chosen:
        layer, unit = (n.layer, n.unit) if isinstance(n, RegisterNeuron) else n
        by_layer.setdefault(int(layer), []).append(int(unit))
    # Index of the new token in each block's stream (the patches start right after it), and at the input.
    slots = [prefix_tokens_at(vit, block) for block in range(len(vit.blocks))]
    entry = slots[0]

    def insert(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x = args[0]
        token = x.new_zeros(x.shape[0], 1, x.shape[2])
        return (torch.cat([x[:, :entry], token, x[:, entry:]], dim=1), *args[1:])

    def move(units: Sequence[int], slot: int):
        index = torch.tensor(units, dtype=torch.long)

        def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            acts = args[0].clone()
            idx = index.to(acts.device)
            patches = acts[:, slot + 1 :, idx]  # [B, P, k]
            acts[:, slot, idx] = _signed_max(patches, dim=1)
            acts[:, slot + 1 :, idx] = 0
            return (acts, *args[1:])

        return hook

    handles = [vit.patch_drop.register_forward_pre_hook(insert)]
    handles += [vit.blocks[layer].mlp.fc2.register_forward_pre_hook(move(units, slots[layer])) for layer, units in sorted(by_layer.items())]
    saved = (vit.num_prefix_tokens, vit.num_reg_tokens)
    vit.num_prefix_tokens, vit.num_reg_tokens = saved[0] + 1, saved[1] + 1
    try:
        yield vit
    finally:
        for handle in handles:
            handle.remove()
        vit.num_prefix_tokens, vit.num_reg_tokens = saved


test_time_register.__test__ = False  # type: ignore[attr-defined]  # a context manager, not a pytest test


def neurons_from(summary: dict[str, object]) -> list[RegisterNeuron]:
    """Neurons back from NeuronSearch.summary() (e.g. a register_neurons.json)."""
    return [RegisterNeuron(int(n["layer"]), int(n["unit"]), float(n["score"])) for n in summary["neurons"]]  # type: ignore[index, union-attr]
