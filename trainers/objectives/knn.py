"""Weighted k-NN classification on frozen features (Wu et al. 2018, as DINO's eval_knn.py).

Features are L2-normalised; each query's k nearest training features (cosine similarity s)
vote for their class with weight exp(s / T). DINO uses k = 20, T = 0.07.

The network runs under the caller's autocast (bf16 on a GPU); the similarities and votes are
computed in fp32 with autocast off: a bf16 matmul would round the similarities (and exp(s / T)
amplifies that 14-fold) and write bf16 weights into the fp32 votes.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from trainers.data.base import Batch

Features = Callable[[torch.Tensor], torch.Tensor]


def collect(features: Features, batches: Iterable[Batch]) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised features [n, D], labels [n]) of every batch."""
    feats, labels = [], []
    for batch in batches:
        feats.append(F.normalize(features(batch.images).float(), dim=-1))
        labels.append(batch.labels)
    if not feats:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.int64)
    return torch.cat(feats), torch.cat(labels)


def knn_predict(
    train: torch.Tensor, train_labels: torch.Tensor, queries: torch.Tensor, num_classes: int, k: int, temperature: float
) -> torch.Tensor:
    """Predicted class of each query [m] from normalised features."""
    with torch.autocast(queries.device.type, enabled=False):
        similarity = queries.float() @ train.float().T
        top, index = similarity.topk(min(k, train.shape[0]), dim=1)
        weights = (top / temperature).exp()
        votes = torch.zeros(queries.shape[0], num_classes, device=queries.device, dtype=weights.dtype)
        votes.scatter_add_(1, train_labels[index], weights)
    return votes.argmax(dim=1)


def knn_top1(
    features: Features, bank: Iterable[Batch], queries: Iterable[Batch], num_classes: int, k: int, temperature: float
) -> float | None:
    """Top-1 on the queries; None when the bank is empty (image-text data has no labelled training images)."""
    train, train_labels = collect(features, bank)
    if train.shape[0] == 0:
        return None
    test, test_labels = collect(features, queries)
    predicted = knn_predict(train, train_labels, test, num_classes, k, temperature)
    return float((predicted == test_labels).float().mean())
