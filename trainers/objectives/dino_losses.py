"""The DINOv2 loss terms on teacher probabilities, and the teacher's centring.

The cross-entropies take the teacher's *probabilities* so that one code path serves both
centrings: momentum centring (DINO: softmax((t - c) / tau_t), then c <- m c + (1 - m) mean(t))
and Sinkhorn-Knopp (DINOv2/SwAV: three alternating normalisations of exp(t / tau_t) over
prototypes and samples). lightly's DINOLoss and IBOTPatchLoss centre internally with momentum
only; tests/test_objectives_dino.py checks that these functions equal them under momentum centring.

Data parallel (DINOv2's dino_clstoken_loss.py and ibot_patch_loss.py): the teacher statistics
are sums over the global batch, so every rank all-reduces them (the Sinkhorn-Knopp sums, the
centre's sum and count): each rank's targets are then exactly those of one process on the
global batch.

No host syncs: iBOT's masked patches are gathered into a buffer of fixed size (`masked_patches`,
as DINOv2's `upperbound`), with a validity flag and a loss weight per slot, instead of boolean
indexing, whose output size the host must read from the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightly.models.modules.center import Center
from torch import nn

SINKHORN_ITERATIONS = 3  # DINOv2's default


def _all_reduce(tensor: torch.Tensor, distributed: bool, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    if distributed:
        dist.all_reduce(tensor, op=op)
    return tensor


@dataclass
class MaskedPatches:
    """Where iBOT's masked patches are, as a fixed number of slots (no data-dependent shapes)."""

    index: torch.Tensor  # long [slots]: positions in the flattened [rows * patches] patch tokens
    valid: torch.Tensor  # bool [slots]: False for the slots after the last masked patch
    weight: torch.Tensor  # float [slots]: 1 / (masked patches of the slot's image); 0 where not valid
    rows: int  # images (global crops) of the batch: iBOT's denominator


def masked_patches(masks: torch.Tensor, slots: int) -> MaskedPatches:
    """The masked patches of masks [rows, h, w] in row-major order, in `slots` >= their count slots.

    A stable sort puts the masked positions first, in order; the slots past them hold unmasked
    positions, flagged not valid. Every shape is known on the host before the step runs."""
    flat = masks.flatten(1)
    rows, patches = flat.shape
    slots = min(slots, rows * patches)
    order = torch.argsort((~flat).flatten().to(torch.uint8), stable=True)
    index = order[:slots]
    valid = flat.flatten()[index]
    per_image = flat.sum(dim=1).clamp(min=1)
    weight = valid / per_image[index // patches]
    return MaskedPatches(index, valid, weight, rows)


@torch.no_grad()
def sinkhorn_knopp(
    logits: torch.Tensor, temperature: float, iterations: int = SINKHORN_ITERATIONS,
    valid: torch.Tensor | None = None, distributed: bool = False,
) -> torch.Tensor:
    """Teacher targets [n, K] whose rows sum to 1 and whose prototypes share the mass equally
    (each column sums to n / K), from logits [n, K] (DINOv2 dino_clstoken_loss.py).

    valid [n]: rows that count (the others get all-zero targets); distributed: the sums are over
    the rows of every rank (all-reduced), as DINOv2 does."""
    logits = logits.float()
    counted = logits if valid is None else logits.masked_fill(~valid.unsqueeze(1), float("-inf"))
    # Subtracting the global maximum changes nothing after the first normalisation but keeps exp
    # finite; it must be the same on every rank, or the ranks' columns would be scaled apart.
    peak = _all_reduce(counted.max(), distributed, dist.ReduceOp.MAX)
    if valid is None:
        q = torch.exp((logits - peak) / temperature).t()  # [K, n]
        samples: torch.Tensor | int = q.shape[1] * (dist.get_world_size() if distributed else 1)
    else:
        # Slots that are not valid get exp(-inf) = 0 and stay 0; the divisors are kept above 0
        # (a batch without any masked patch gives all-zero targets instead of NaN).
        z = ((logits - torch.nan_to_num(peak, neginf=0.0)) / temperature).masked_fill(~valid.unsqueeze(1), float("-inf"))
        q = torch.exp(z).t()
        samples = _all_reduce(valid.sum().float(), distributed)
    prototypes = q.shape[0]

    def positive(total: torch.Tensor) -> torch.Tensor:
        return total if valid is None else total.clamp(min=torch.finfo(q.dtype).tiny)

    q /= positive(_all_reduce(q.sum(), distributed))
    for _ in range(iterations):
        q /= positive(_all_reduce(q.sum(dim=1, keepdim=True), distributed))
        q /= prototypes
        q /= positive(q.sum(dim=0, keepdim=True))
        q /= positive(samples) if valid is not None else samples
    q *= samples
    return q.t()


class TeacherCentring(nn.Module):
    """Teacher logits -> target probabilities, by momentum centring or Sinkhorn-Knopp."""

    def __init__(self, mode: str, dim: int, momentum: float) -> None:
        super().__init__()
        self.mode = mode
        # The centre is a buffer, so it travels in the state dict (and the checkpoint).
        self.centre = Center(size=(1, dim), momentum=momentum) if mode == "momentum" else None

    @torch.no_grad()
    def forward(
        self, logits: torch.Tensor, temperature: float, valid: torch.Tensor | None = None, distributed: bool = False
    ) -> torch.Tensor:
        logits = logits.float()
        if self.centre is None:
            return sinkhorn_knopp(logits, temperature, valid=valid, distributed=distributed)
        probs = F.softmax((logits - self.centre.value) / temperature, dim=-1)
        self._update(logits, valid, distributed)  # after use: the centre of step s holds steps < s
        return probs

    def _update(self, logits: torch.Tensor, valid: torch.Tensor | None, distributed: bool) -> None:
        """c <- m c + (1 - m) mean of the counted rows of the global batch (a sum and a count, all-reduced)."""
        if valid is None:
            total = logits.sum(dim=0, keepdim=True)
            count = torch.full((), logits.shape[0], dtype=logits.dtype, device=logits.device)
        else:
            total = (logits * valid.unsqueeze(1)).sum(dim=0, keepdim=True)
            count = valid.sum().to(logits.dtype)
        if distributed:
            both = _all_reduce(torch.cat([total.flatten(), count.view(1)]), True)
            total, count = both[:-1].view_as(total), both[-1]
        assert self.centre is not None
        m = self.centre.momentum
        self.centre.center = self.centre.center * m + (total / count) * (1 - m)


def dino_cross_entropy(teacher_probs: list[torch.Tensor], student_logits: list[torch.Tensor], student_temp: float) -> torch.Tensor:
    """Mean over crop pairs (teacher t, student s), s != t, of mean_b -sum_k p_t log softmax(x_s / tau_s).

    Teacher crop i and student crop i are the same view (the global crops), so those pairs are skipped.
    """
    total = torch.zeros((), device=student_logits[0].device)
    terms = 0
    for s_index, logits in enumerate(student_logits):
        log_p = F.log_softmax(logits.float() / student_temp, dim=-1)
        for t_index, probs in enumerate(teacher_probs):
            if s_index != t_index:
                total = total - (probs * log_p).sum(dim=-1).mean()
                terms += 1
    return total / terms


def ibot_cross_entropy(
    teacher_probs: torch.Tensor, student_logits: torch.Tensor, patches: MaskedPatches, student_temp: float
) -> torch.Tensor:
    """iBOT on masked patches: each image's mean cross-entropy over its masked patches, summed
    and divided by the number of images (unmasked images count as zero), as DINOv2.

    teacher_probs, student_logits: [slots, K], one row per slot of `patches`; slots that are not
    valid weigh 0."""
    ce = -(teacher_probs * F.log_softmax(student_logits.float() / student_temp, dim=-1)).sum(dim=-1)
    return (ce * patches.weight).sum() / patches.rows
