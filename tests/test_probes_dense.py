"""Segmentation, corloc and neighbour-similarity helpers on cases with known answers."""

from __future__ import annotations

import pytest
import torch

from trainers.probes.dense import corloc, mean_iou, patch_labels, patch_pixels, segmentation_miou
from trainers.probes.outliers import neighbour_cosine


def test_mean_iou_of_a_known_case():
    target = torch.tensor([0, 0, 1, 1, 2, 2])
    predicted = torch.tensor([0, 1, 1, 1, 2, 0])
    # label 0: inter 1, union 3; label 1: inter 2, union 3; label 2: inter 1, union 2
    assert mean_iou(predicted, target, 3) == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert mean_iou(target, target, 5) == 1.0  # labels absent from both are not averaged in


def test_patch_labels_take_the_majority_of_each_patch():
    masks = torch.zeros(1, 8, 8, dtype=torch.long)
    masks[0, :4, :3] = 2  # top-left 4x4 patch: 12 of 16 pixels are label 2
    masks[0, 4:, 4:5] = 1  # bottom-right patch: 4 of 16 pixels are label 1
    assert patch_labels(masks, (2, 2), 3).tolist() == [[2, 0, 0, 0]]


def test_patch_pixels_follow_the_token_order():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float).reshape(2, 3, 8, 8)
    pixels = patch_pixels(images, (2, 2))
    assert pixels.shape == (2, 4, 3 * 16)
    # token 1 is the top-right patch: its first value is channel 0, row 0, column 4
    assert pixels[0, 1, 0] == images[0, 0, 0, 4]


def test_segmentation_probe_is_perfect_on_separable_features():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (8, 16), generator=generator)
    codes = torch.randn(3, 32, generator=generator)
    features = codes[labels] + 0.01 * torch.randn(8, 16, 32, generator=generator)
    assert segmentation_miou(features, labels, 3) == pytest.approx(1.0)


def test_corloc_counts_attention_peaks_inside_the_object():
    masks = torch.zeros(3, 16, 16, dtype=torch.long)
    masks[:2, 4:12, 4:12] = 1  # images 0 and 1 have an object in the middle; image 2 has none
    inside, outside = torch.zeros(3, 4, 4), torch.zeros(3, 4, 4)
    inside[:, 1, 2] = 1.0  # patch (1, 2) covers pixels 4..7 x 8..11: all object
    outside[:, 0, 0] = 1.0
    assert corloc(inside, masks) == 1.0
    assert corloc(outside, masks) == 0.0
    assert torch.isnan(torch.tensor(corloc(inside, torch.zeros(3, 16, 16, dtype=torch.long))))


def test_neighbour_cosine_is_high_on_redundant_patches():
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(1, 16, 32, generator=generator)  # 4x4 grid of unrelated patches
    embeddings[0, [0, 1, 4, 5]] = embeddings[0, 0].clone()  # a flat top-left 2x2 region
    cosine = neighbour_cosine(embeddings, (4, 4))
    # patch 0 has neighbours 1 and 4, both identical to it
    assert float(cosine[0, 0]) == pytest.approx(1.0)
    assert float(cosine[0, 15].abs()) < 0.5
