"""Test-time registers on a planted register neuron: the search must find it, and moving its
activations into the extra token must remove the artifacts from the patches and put the
high norm on that token (trainers/test_time)."""

from __future__ import annotations

import pytest
import torch
from planted_neuron import background_images, plant_register_neuron

from trainers.config import ModelConfig, ProbeConfig
from trainers.data.base import Batch
from trainers.model import build_model
from trainers.probes import names
from trainers.probes.report import run_probes
from trainers.test_time import (
    FAMILY_DEFAULTS,
    TestTimeRegisterConfig,
    default_config,
    find_register_neurons,
    generic_max_layer,
    test_time_register,
)

LAYER, UNIT = 1, 7
CHOSEN = 4  # patches per image, of 64: the planted outlier fraction is 1/16
OUTPUT_FRAC = names.outlier_frac(names.OUTPUT)


def planted_model(registers: int = 0, by: str = "content", positions=None) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(ModelConfig(size="micro", img_size=32, patch_size=4, num_registers=registers), 6).eval()
    return plant_register_neuron(model, layer=LAYER, unit=UNIT, by=by, positions=positions)


@pytest.fixture(scope="module")
def data():
    images, chosen = background_images(32, 32, 4, CHOSEN, seed=1)
    return Batch(images, torch.arange(32) % 6), chosen


def probe(model, batch) -> dict[str, float]:
    return run_probes(model, batch, ProbeConfig(), figures=False).scalars


def test_the_planted_outliers_are_exactly_the_chosen_patches(data):
    batch, chosen = data
    model = planted_model()
    with torch.no_grad():
        _, blocks = model.forward_intermediates(batch.images, norm=False, output_fmt="NLC")
    norms = blocks[-1].norm(dim=-1)
    assert norms[chosen].min() > 10 * norms[~chosen].max()  # a separate high mode, about 30x
    assert probe(model, batch)[OUTPUT_FRAC] == pytest.approx(CHOSEN / 64)


@pytest.mark.parametrize("threshold", [None, 100.0])  # the robust detector, and an absolute cutoff as in the paper
def test_search_ranks_the_planted_neuron_first(data, threshold):
    batch, _ = data
    search = find_register_neurons(planted_model(), batch.images, TestTimeRegisterConfig(threshold=threshold, top_k=5))
    assert (search.neurons[0].layer, search.neurons[0].unit) == (LAYER, UNIT)
    assert search.neurons[0].score > 5 * search.neurons[1].score  # 12x here
    assert len(search.neurons) == 5
    assert search.outlier_fraction == pytest.approx(CHOSEN / 64)
    assert search.images_with_outliers == 32
    assert search.detector == ("robust" if threshold is None else "abs")
    assert search.max_layer == generic_max_layer(4) == 1


def test_the_layer_cap_hides_a_neuron_above_it(data):
    batch, _ = data
    search = find_register_neurons(planted_model(), batch.images, TestTimeRegisterConfig(max_layer=0))
    assert all(n.layer == 0 for n in search.neurons)
    assert search.scores.shape[0] == 1


def output_tokens(model, images) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw last-block output: (patches [B, P, D], prefix [B, n, D])."""
    with torch.no_grad():
        _, blocks = model.forward_intermediates(images, return_prefix_tokens=True, norm=False, output_fmt="NLC")
    return blocks[-1]


def test_test_time_register_removes_the_outliers_and_carries_the_norm(data):
    batch, chosen = data
    model = planted_model()
    before = probe(model, batch)
    outlier_norms = output_tokens(model, batch.images)[0].norm(dim=-1)[chosen]
    search = find_register_neurons(model, batch.images, TestTimeRegisterConfig(top_k=10))
    with test_time_register(model, search) as patched:
        assert patched.num_prefix_tokens == 2 and patched.num_reg_tokens == 1
        after = probe(model, batch)
        patches, prefix = output_tokens(model, batch.images)
    assert before[OUTPUT_FRAC] == pytest.approx(CHOSEN / 64)
    assert after[OUTPUT_FRAC] == 0.0
    assert after[names.outlier_frac(names.block(LAYER))] == 0.0
    # The register holds the high norm now, in every image about as high as the outliers had it,
    # and no patch is left far above the median.
    register_norms = prefix[:, 1].norm(dim=-1)
    assert register_norms.min() > 0.8 * outlier_norms.median()
    median = after[names.norm_stat("median", "patch", names.OUTPUT)]
    assert after[names.norm_stat("mean", "reg_00", names.OUTPUT)] > 20 * median
    assert patches.norm(dim=-1).max() < 2 * median


def test_the_other_patches_are_left_alone(data):
    batch, chosen = data
    model = planted_model()
    with torch.no_grad():
        plain = model.forward_features(batch.images)[:, 1:]
        with test_time_register(model, [(LAYER, UNIT)]):
            moved = model.forward_features(batch.images)[:, 2:]
    cosine = torch.nn.functional.cosine_similarity(plain[~chosen], moved[~chosen], dim=-1)
    assert cosine.min() > 0.95


def test_the_model_is_restored_after_the_context(data):
    batch, _ = data
    model = planted_model(registers=2)
    with torch.no_grad():
        reference = model(batch.images)
        with test_time_register(model, [(LAYER, UNIT)]) as patched:
            assert patched.num_prefix_tokens == 4
            assert probe(model, batch)[names.norm_stat("mean", "reg_02", names.OUTPUT)] > 0  # the third register
        assert model.num_prefix_tokens == 3 and model.num_reg_tokens == 2
        assert torch.equal(model(batch.images), reference)


def test_a_position_planted_neuron_fires_on_any_image():
    model = planted_model(by="position", positions=[0, 9, 63])
    images = torch.randn(8, 3, 32, 32)
    search = find_register_neurons(model, images, TestTimeRegisterConfig())
    assert (search.neurons[0].layer, search.neurons[0].unit) == (LAYER, UNIT)
    assert search.outlier_fraction == pytest.approx(3 / 64)


def test_no_outliers_no_neurons():
    torch.manual_seed(0)
    model = build_model(ModelConfig(size="micro", img_size=32, patch_size=4), 6).eval()
    search = find_register_neurons(model, torch.randn(8, 3, 32, 32), TestTimeRegisterConfig())
    assert search.neurons == [] and search.images_with_outliers == 0 and search.outlier_fraction == 0.0


def test_paper_defaults_per_family():
    clip = default_config("vit_base_patch16_clip_224")
    assert (clip.detect_layer, clip.threshold, clip.top_k, clip.max_layer) == (-1, 30.0, 10, 5)
    dino = default_config("vit_large_patch14_dinov2")
    assert (dino.detect_layer, dino.threshold, dino.top_k, dino.max_layer) == (-2, 150.0, 50, 17)
    other = default_config("vit_small_patch14_dinov2")
    assert (other.detect_layer, other.threshold, other.top_k, other.max_layer) == (-1, None, 10, None)
    assert set(FAMILY_DEFAULTS) == {"vit_base_patch16_clip", "vit_large_patch14_dinov2"}
