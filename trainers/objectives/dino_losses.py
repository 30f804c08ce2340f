"""The DINOv2 loss terms on teacher probabilities, and the teacher's centring.

The cross-entropies take the teacher's *probabilities* so that one code path serves both
centrings: momentum centring (DINO: softmax((t - c) / tau_t), then c <- m c + (1 - m) mean(t),
with lightly's `Center` keeping c) and Sinkhorn-Knopp (DINOv2/SwAV: three alternating
normalisations of exp(t / tau_t) over prototypes and samples). lightly's DINOLoss and
IBOTPatchLoss centre internally with momentum only; tests/test_objectives_dino.py checks that
these functions equal them under momentum centring.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightly.models.modules.center import Center
from torch import nn

SINKHORN_ITERATIONS = 3  # DINOv2's default


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temperature: float, iterations: int = SINKHORN_ITERATIONS) -> torch.Tensor:
    """Teacher targets [n, K] whose rows sum to 1 and whose prototypes share the mass equally
    (each column sums to n / K), from logits [n, K] (DINOv2 dino_clstoken_loss.py)."""
    logits = logits.float()
    # Subtracting the global maximum changes nothing after the first normalisation but keeps exp finite.
    q = torch.exp((logits - logits.max()) / temperature).t()  # [K, n]
    prototypes, samples = q.shape
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= prototypes
        q /= q.sum(dim=0, keepdim=True)
        q /= samples
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
    def forward(self, logits: torch.Tensor, temperature: float) -> torch.Tensor:
        logits = logits.float()
        if self.centre is None:
            return sinkhorn_knopp(logits, temperature)
        probs = F.softmax((logits - self.centre.value) / temperature, dim=-1)
        self.centre.update(logits)  # after use: the centre of step s holds steps < s
        return probs


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
    teacher_probs: torch.Tensor, student_logits: torch.Tensor, masks: torch.Tensor, student_temp: float
) -> torch.Tensor:
    """iBOT on masked patches: each image's mean cross-entropy over its masked patches, summed
    and divided by the number of images (unmasked images count as zero), as DINOv2.

    teacher_probs, student_logits: [M, K] for the M masked patches in masks' row-major order.
    """
    ce = -(teacher_probs * F.log_softmax(student_logits.float() / student_temp, dim=-1)).sum(dim=-1)
    flat = masks.flatten(1)
    weight = (1.0 / flat.sum(dim=1).clamp(min=1)).unsqueeze(1).expand_as(flat)[flat]
    return (ce * weight).sum() / flat.shape[0]
