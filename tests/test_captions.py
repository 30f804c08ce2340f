"""Captions of the 'shapes' images name the shape and the colour actually rendered."""

from __future__ import annotations

import torch

from trainers.data.captions import COLOUR_NAMES, PALETTE, colour_names, position_phrase
from trainers.data.shapes import SHAPE_NAMES, ShapesSource

CPU = torch.device("cpu")


def _source(seed: int = 0) -> ShapesSource:
    return ShapesSource(num_classes=8, train_size=64, val_size=64, img_size=64, seed=seed, device=CPU)


def test_captions_name_the_rendered_shape_and_colour() -> None:
    source = _source()
    batch = source._render("val", torch.arange(64), size=64, normalise=False)
    assert batch.captions is not None and len(batch.captions) == 64
    for i, caption in enumerate(batch.captions):
        words = caption.split()
        shape = SHAPE_NAMES[int(batch.labels[i])]
        assert shape in words, caption
        inside = batch.masks[i] > 0
        assert inside.any()
        # The object is drawn in one flat colour: read it off the pixels and name it.
        rendered = batch.images[i][:, inside].mean(dim=1)
        assert colour_names(rendered.view(1, 3))[0] == words[2], caption
        assert caption.startswith(f"a {words[1]} {words[2]} {shape} ")
        assert words[1] in ("small", "medium", "large") and caption.endswith(" background")


def test_captions_are_deterministic_per_seed_and_travel_with_training_batches() -> None:
    first = next(_source(0).train_batches(0, 16)).captions
    assert first == next(_source(0).train_batches(0, 16)).captions
    assert first != next(_source(1).train_batches(0, 16)).captions


def test_position_words_follow_the_object_centre() -> None:
    source = _source()
    params = source._cpu_params["val"]
    batch = source._render("val", torch.arange(64), size=64, normalise=False)
    for row, caption in zip(params, batch.captions):
        cx, cy = float(row[0]), float(row[1])
        if cy < 1 / 3:
            assert "top" in caption
        if cy > 2 / 3:
            assert "bottom" in caption
        if cx < 1 / 3:
            assert "left" in caption
        if cx > 2 / 3:
            assert "right" in caption
    assert position_phrase(1, 1) == "in the centre" and position_phrase(0, 0) == "in the top left"


def test_palette_names_its_own_colours() -> None:
    assert colour_names(torch.tensor(list(PALETTE.values()))) == list(COLOUR_NAMES)
