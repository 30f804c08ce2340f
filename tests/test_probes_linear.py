"""Closed-form linear probes recover what is linearly there and nothing that is not."""

from __future__ import annotations

import pytest
import torch

from trainers.probes import names
from trainers.probes.linear import class_probes, fit_ridge, token_probes

B, P, D = 16, 64, 64


def generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def test_ridge_fits_a_linear_map_in_primal_and_dual_form():
    g = generator()
    weight = torch.randn(8, 3, generator=g)
    for n in (200, 5):  # n > D: primal; n < D: dual
        x = torch.randn(n, 8, generator=g)
        predict = fit_ridge(x, x @ weight, alpha=1e-6)
        x_new = torch.randn(50, 8, generator=g)
        error = (predict(x_new) - (x_new @ weight).double()).abs().max()
        assert (error < 1e-3) == (n == 200)  # 5 samples cannot pin down 8 inputs


def test_position_is_recoverable_from_position_dominated_tokens():
    g = generator()
    position_embedding = torch.randn(P, D, generator=g)
    features = position_embedding.expand(B, P, D) + 0.05 * torch.randn(B, P, D, generator=g)
    pixels = torch.randn(B, P, 12, generator=g)
    outliers = torch.zeros(B, P, dtype=torch.bool)
    scores = token_probes(features, outliers, pixels, generator())
    assert scores[names.linear_probe("position_acc", "normal")] == 1.0
    assert names.linear_probe("position_acc", "outlier") not in scores  # no outliers: variant skipped


def test_outlier_tokens_without_local_information_lose_position_and_pixels():
    g = generator()
    position_embedding = torch.randn(P, D, generator=g)
    pixels = torch.randn(B, P, 12, generator=g)
    mixing = torch.randn(12, D, generator=g)
    features = position_embedding + pixels @ mixing  # normal tokens: position + pixels, linearly
    outliers = torch.zeros(B, P, dtype=torch.bool)
    for image in range(B):
        outliers[image, torch.randperm(P, generator=g)[:4]] = True
    features[outliers] = 30 * torch.randn(int(outliers.sum()), D, generator=g)  # global junk, no local content
    scores = token_probes(features, outliers, pixels, generator())
    accuracy = {t: scores[names.linear_probe("position_acc", t)] for t in ("outlier", "normal_matched", "normal")}
    mse = {t: scores[names.linear_probe("pixel_mse", t)] for t in ("outlier", "normal_matched", "normal")}
    assert accuracy["normal"] == 1.0
    assert accuracy["outlier"] < 0.1 < accuracy["normal_matched"]
    assert mse["normal"] < 0.05
    assert mse["outlier"] > 0.8  # pixels have variance 1: predicting the mean


def test_class_from_one_token_follows_the_token_that_carries_it():
    g = generator()
    labels = torch.arange(32) % 4
    class_codes = torch.randn(4, D, generator=g)
    features = torch.randn(32, 2 + P, D, generator=g)  # [CLS], one register, patches
    features[:, 0] += 5 * class_codes[labels]  # only [CLS] knows the class
    outliers = torch.zeros(32, P, dtype=torch.bool)
    outliers[:, 5] = True
    features[:, 2 + 5] = 5 * class_codes[labels] + 0.1 * torch.randn(32, D, generator=g)  # and the outlier
    norms = features[:, 2:].norm(dim=-1)
    scores = class_probes(features, labels, 4, 2, True, outliers, norms, generator())
    assert scores[names.linear_probe("class_acc", "cls")] == 1.0
    assert scores[names.linear_probe("class_acc", "outlier")] == 1.0
    assert scores[names.linear_probe("class_acc", "normal")] <= 0.5
    assert scores[names.linear_probe("class_acc", "reg")] <= 0.5


def test_probes_skip_batches_too_small_to_split():
    features = torch.randn(3, P, D)
    assert token_probes(features, torch.zeros(3, P, dtype=torch.bool), torch.randn(3, P, 12), generator()) == {}


@pytest.mark.parametrize("count", [1, 3])
def test_outlier_variants_need_enough_outliers(count):
    features = torch.randn(B, P, D)
    outliers = torch.zeros(B, P, dtype=torch.bool)
    outliers[:, :count] = True  # 12 train images * count outlier tokens
    scores = token_probes(features, outliers, torch.randn(B, P, 12), generator())
    assert (names.linear_probe("position_acc", "outlier") in scores) == (12 * count >= 16)
