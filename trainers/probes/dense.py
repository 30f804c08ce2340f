"""Dense payoff of clean features (paper Table 2 and 3, in miniature).

* Linear segmentation: closed-form ridge from frozen, normed output patch tokens to the
  mask label of each patch (majority over its pixels), trained on the first images of the
  probe batch and scored as mIoU on the held-out ones.
* Object discovery corloc: an image counts as found when the patch that receives the most
  [CLS] attention is an object patch (at least CORLOC_OBJECT_FRACTION of its pixels are
  object). The paper runs LOST on DINOv2 features; [CLS] attention is the cheap stand-in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainers.probes.linear import fit_ridge, train_images

CORLOC_OBJECT_FRACTION = 0.5


def patch_pixels(images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[B, C, H, W] -> [B, P, C * ph * pw], patches in the row-major order of the tokens."""
    ph, pw = images.shape[2] // grid[0], images.shape[3] // grid[1]
    return F.unfold(images, kernel_size=(ph, pw), stride=(ph, pw)).transpose(1, 2)


def label_fractions(masks: torch.Tensor, grid: tuple[int, int], num_labels: int) -> torch.Tensor:
    """Share of each label's pixels in each patch: [B, H, W] -> [B, P, num_labels]."""
    one_hot = F.one_hot(masks.long(), num_labels).permute(0, 3, 1, 2).float()
    pooled = F.adaptive_avg_pool2d(one_hot, grid) if masks.shape[1:] != grid else one_hot
    return pooled.flatten(2).transpose(1, 2)


def patch_labels(masks: torch.Tensor, grid: tuple[int, int], num_labels: int) -> torch.Tensor:
    """Majority label of each patch: [B, H, W] -> [B, P] (ties go to the lower label)."""
    return label_fractions(masks, grid, num_labels).argmax(-1)


def mean_iou(predicted: torch.Tensor, target: torch.Tensor, num_labels: int) -> float:
    """Mean IoU over the labels that occur in the prediction or the target."""
    ious = []
    for label in range(num_labels):
        pred, true = predicted == label, target == label
        union = (pred | true).sum()
        if union > 0:
            ious.append(float((pred & true).sum()) / float(union))
    return sum(ious) / len(ious) if ious else float("nan")


def segmentation_miou(features: torch.Tensor, labels: torch.Tensor, num_labels: int) -> float:
    """features [B, P, D] patch tokens, labels [B, P] patch labels -> held-out mIoU."""
    batch, _, dim = features.shape
    n_train = train_images(batch)
    predict = fit_ridge(features[:n_train].reshape(-1, dim), F.one_hot(labels[:n_train].flatten(), num_labels).double())
    predicted = predict(features[n_train:].reshape(-1, dim)).argmax(-1)
    return mean_iou(predicted, labels[n_train:].flatten(), num_labels)


def corloc(cls_maps: torch.Tensor, masks: torch.Tensor) -> float:
    """cls_maps [B, h, w] attention over patches, masks [B, H, W] -> share of images found.

    Images without any object pixel are left out; NaN when no image has an object.
    """
    grid = tuple(cls_maps.shape[1:])
    object_share = 1.0 - label_fractions(masks, grid, int(masks.max()) + 1)[..., 0]  # [B, P]  # type: ignore[arg-type]
    peak = cls_maps.flatten(1).argmax(dim=1)
    found = object_share.gather(1, peak.unsqueeze(1)).squeeze(1) >= CORLOC_OBJECT_FRACTION
    has_object = (masks > 0).flatten(1).any(dim=1)
    if not has_object.any():
        return float("nan")
    return float(found[has_object].float().mean())
