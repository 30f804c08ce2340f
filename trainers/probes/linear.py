"""What outlier tokens hold (paper Table 1): cheap closed-form linear probes on one batch.

Ridge regression (features standardised on the train part, lambda = RIDGE_ALPHA * n)
solved with torch.linalg.solve in float64, primal or dual form, whichever system is
smaller. Classification uses one-hot targets and argmax. The probe batch is split by
IMAGE (first TRAIN_FRACTION of the images train, the rest are held out), so no test
token shares an image with a train token.

Token groups: `outlier` (robust detector at the output), `normal` (non-outliers, up to
MAX_TOKENS per split: comparable across steps), `normal_matched` (non-outliers drawn to
the same count as the outliers in each split: the fair comparison to `outlier`, since
ridge scores depend on the sample count). Outlier variants need MIN_OUTLIER_TRAIN tokens
(images, for the class probe) in the train part and MIN_OUTLIER_TEST in the held-out part.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainers.probes import names

RIDGE_ALPHA = 0.1
TRAIN_FRACTION = 0.75
MIN_IMAGES = 4  # below this, no held-out split is worth having: the probes are skipped
MIN_OUTLIER_TRAIN = 16
MIN_OUTLIER_TEST = 4
MIN_OUTLIER_TRAIN_IMAGES = 8
MIN_OUTLIER_TEST_IMAGES = 2
MAX_TOKENS = 2048  # per split, keeps the solve cheap for wide models and big batches


def fit_ridge(x: torch.Tensor, y: torch.Tensor, alpha: float = RIDGE_ALPHA):
    """Fit y ~ x on [n, D] and [n, T]; returns predict(x_new) -> [m, T]."""
    x, y = x.double(), y.double()
    mean_x, mean_y = x.mean(0), y.mean(0)
    scale = x.std(0, unbiased=False)
    scale = torch.where(scale > 1e-6 * scale.max().clamp_min(1e-12), scale, torch.ones_like(scale))
    xs, yc = (x - mean_x) / scale, y - mean_y
    n, d = xs.shape
    lam = alpha * n
    if d <= n:
        weight = torch.linalg.solve(xs.T @ xs + lam * torch.eye(d, dtype=xs.dtype, device=xs.device), xs.T @ yc)
    else:  # dual form: (X^T X + lam I)^-1 X^T = X^T (X X^T + lam I)^-1
        weight = xs.T @ torch.linalg.solve(xs @ xs.T + lam * torch.eye(n, dtype=xs.dtype, device=xs.device), yc)

    def predict(x_new: torch.Tensor) -> torch.Tensor:
        return ((x_new.double() - mean_x) / scale) @ weight + mean_y

    return predict


def classification_accuracy(
    x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor, num_classes: int
) -> float:
    predict = fit_ridge(x_train, F.one_hot(y_train, num_classes).double())
    return float((predict(x_test).argmax(-1) == y_test).double().mean())


def regression_mse(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor) -> float:
    predict = fit_ridge(x_train, y_train)
    return float(((predict(x_test) - y_test.double()) ** 2).mean())


def train_images(batch: int) -> int:
    return min(batch - 1, max(1, round(TRAIN_FRACTION * batch)))


def _pick(candidates: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` of the flat indices in `candidates`, drawn without replacement, reproducibly."""
    order = torch.randperm(len(candidates), generator=generator)[:count]
    return candidates[order.to(candidates.device)]


def token_probes(
    features: torch.Tensor, outliers: torch.Tensor, pixels: torch.Tensor, generator: torch.Generator
) -> dict[str, float]:
    """Position and pixel probes on patch tokens. features [B, P, D], outliers [B, P], pixels [B, P, 3p^2]."""
    batch, patches, dim = features.shape
    if batch < MIN_IMAGES:
        return {}
    in_train = (torch.arange(batch, device=features.device) < train_images(batch)).unsqueeze(1).expand(batch, patches)
    flat_features, flat_pixels = features.reshape(-1, dim), pixels.reshape(batch * patches, -1)
    positions = torch.arange(patches, device=features.device).repeat(batch)
    flat_out, flat_train = outliers.flatten(), in_train.flatten()

    def split(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.nonzero(mask & flat_train).flatten(), torch.nonzero(mask & ~flat_train).flatten()

    out_train, out_test = split(flat_out)
    normal_train, normal_test = split(~flat_out)
    groups = {"normal": (_pick(normal_train, MAX_TOKENS, generator), _pick(normal_test, MAX_TOKENS, generator))}
    if len(out_train) >= MIN_OUTLIER_TRAIN and len(out_test) >= MIN_OUTLIER_TEST:
        out_train, out_test = out_train[:MAX_TOKENS], out_test[:MAX_TOKENS]
        groups["outlier"] = (out_train, out_test)
        groups["normal_matched"] = (
            _pick(normal_train, len(out_train), generator),
            _pick(normal_test, len(out_test), generator),
        )

    scores: dict[str, float] = {}
    for token, (tr, te) in groups.items():
        if len(tr) == 0 or len(te) == 0:
            continue
        scores[names.linear_probe("position_acc", token)] = classification_accuracy(
            flat_features[tr], positions[tr], flat_features[te], positions[te], patches
        )
        scores[names.linear_probe("pixel_mse", token)] = regression_mse(
            flat_features[tr], flat_pixels[tr], flat_features[te], flat_pixels[te]
        )
    return scores


def class_probes(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    num_prefix: int,
    has_cls: bool,
    outliers: torch.Tensor,
    patch_norms: torch.Tensor,
    generator: torch.Generator,
) -> dict[str, float]:
    """Image class from one token per image. features [B, N, D] (prefix first); outliers, patch_norms [B, P].

    Tokens: [CLS]; the first register (`reg`); a random normal patch (`normal`); the
    highest-norm outlier of each image that has one (`outlier`) and a random normal patch
    of those same images (`normal_matched`).
    """
    batch = features.shape[0]
    if batch < MIN_IMAGES:
        return {}
    rows = torch.arange(batch, device=features.device)
    n_train = train_images(batch)
    patches = features[:, num_prefix:]
    tokens: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # token -> (features [m, D], image index [m])
    if has_cls:
        tokens["cls"] = (features[:, 0], rows)
    if num_prefix > int(has_cls):
        tokens["reg"] = (features[:, int(has_cls)], rows)
    tokens["normal"] = (patches[rows, _random_normal(outliers, generator)], rows)
    has_outlier = outliers.any(dim=1)
    with_out = torch.nonzero(has_outlier).flatten()
    enough_train = int((with_out < n_train).sum()) >= MIN_OUTLIER_TRAIN_IMAGES
    if enough_train and int((with_out >= n_train).sum()) >= MIN_OUTLIER_TEST_IMAGES:
        loudest = patch_norms.masked_fill(~outliers, -1.0).argmax(dim=1)
        tokens["outlier"] = (patches[with_out, loudest[with_out]], with_out)
        normal = _random_normal(outliers, generator)
        tokens["normal_matched"] = (patches[with_out, normal[with_out]], with_out)

    scores: dict[str, float] = {}
    for token, (x, image) in tokens.items():
        tr, te = image < n_train, image >= n_train
        scores[names.linear_probe("class_acc", token)] = classification_accuracy(
            x[tr], labels[image[tr]], x[te], labels[image[te]], num_classes
        )
    return scores


def _random_normal(outliers: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Index of one random non-outlier patch per image ([B]); any patch if all are outliers."""
    noise = torch.rand(outliers.shape, generator=generator).to(outliers.device)
    return noise.masked_fill(outliers, -1.0).argmax(dim=1)
