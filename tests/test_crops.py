"""Crop geometry (trainers/data/crops.py): torchvision's RandomResizedCrop boxes drawn on the host,
and the two cutters, in float32 whatever the autocast."""

from __future__ import annotations

import numpy as np
import torch

from trainers.data.crops import crop_boxes, cut_crops, cut_same_size, draw_uniforms, eval_box, resized_crop


def test_boxes_follow_random_resized_crop() -> None:
    u = np.concatenate([draw_uniforms(s, 1) for s in range(500)])
    heights, widths = np.full(500, 375), np.full(500, 500)
    boxes, flips = crop_boxes(u, heights, widths, (0.08, 1.0))
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 375).all() and (left + w <= 500).all()
    area = h * w / (375 * 500)
    assert area.min() > 0.07 and area.max() <= 1.0 and 0.3 < flips.mean() < 0.7
    assert (w / h > 0.74).all() and (w / h < 1.35).all()
    assert np.array_equal(crop_boxes(u, heights, widths, (0.08, 1.0))[0], boxes)  # a pure function of the draws


def test_no_fitting_box_falls_back_to_a_central_crop() -> None:
    # A 10 x 1000 strip cannot hold a box of 90-100% of its area with a ratio in [3/4, 4/3].
    boxes, _ = crop_boxes(draw_uniforms(1, 3), np.full(3, 10), np.full(3, 1000), (0.9, 1.0))
    assert (boxes == [0, 493, 10, 13]).all()  # torchvision: w = round(10 * 4/3), centred
    assert eval_box(300, 400) == (19, 69, 262, 262)


def test_cutters_agree_and_ignore_autocast() -> None:
    image = torch.nn.functional.interpolate(torch.rand(1, 3, 6, 8) * 255, size=(30, 40), mode="bilinear")[0].to(torch.uint8)
    box = np.array([[3, 5, 20, 24]])
    alone = resized_crop(image, box[0], 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        batched = cut_crops([image], [0], box, np.array([False]), 12)
        same = cut_same_size(image[None].float(), np.array([0]), box, np.array([True]), 12)
    assert batched.dtype == torch.uint8 and same.dtype == torch.float32
    assert (batched[0].int() - alone.int()).abs().float().mean() < 2
    assert torch.allclose(same[0].flip(-1).round(), batched[0].float(), atol=1)
    # A box of the whole image at its own size gives the image back.
    whole = cut_crops([image], [0], np.array([[0, 0, 30, 40]]), np.array([False]), 30)
    assert whole.shape == (1, 3, 30, 30)
    full = cut_same_size(image[None].float(), np.array([0]), np.array([[0, 0, 30, 30]]), np.array([False]), 30)
    assert torch.allclose(full[0], image[:, :, :30].float(), atol=1e-3)
