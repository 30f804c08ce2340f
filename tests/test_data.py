"""Data sources: determinism by (seed, step), masks, real-data loaders on tiny files, preflight, s3 sync."""

from __future__ import annotations

import pickle
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainers.config import SHAPE_KINDS, DataConfig
from trainers.data import DatasetNotFoundError, build_data, check_data
from trainers.data.sampling import EpochOrder
from trainers.data.shapes import ANGLE, MAX_CLASSES, SHAPE_NAMES, draw_parameters

CPU = torch.device("cpu")


def shapes(seed: int = 0, **overrides):
    cfg = DataConfig(name="shapes", **{"num_classes": 6, "train_size": 40, "val_size": 24, **overrides})
    return build_data(cfg, img_size=32, seed=seed, device=CPU)


def batch_at(source, step: int, batch_size: int, start: int = 0):
    return next(islice(source.train_batches(start, batch_size), step - start, None))


def assert_same(a, b) -> None:
    torch.testing.assert_close(a.images, b.images, rtol=0, atol=0)
    assert torch.equal(a.labels, b.labels)
    assert (a.masks is None and b.masks is None) or torch.equal(a.masks, b.masks)


# --- shapes -------------------------------------------------------------------------------


def test_shapes_same_seed_same_tensors_and_different_seed_differs() -> None:
    a, b, c = shapes(seed=1), shapes(seed=1), shapes(seed=2)
    assert_same(batch_at(a, 0, 8), batch_at(b, 0, 8))
    assert_same(a.probe_batch(8), b.probe_batch(8))
    assert not torch.equal(batch_at(a, 0, 8).images, batch_at(c, 0, 8).images)
    assert not torch.equal(a.probe_batch(8).images, c.probe_batch(8).images)


def test_shapes_train_and_val_are_different_streams() -> None:
    source = shapes()
    train = torch.cat([b.images for b in islice(source.train_batches(0, 8), 5)])  # one epoch of 40
    val = source.probe_batch(24).images
    # No val image equals any train image.
    distances = torch.cdist(val.flatten(1), train.flatten(1))
    assert distances.min() > 1.0


def test_shapes_resume_gives_identical_batches_across_epoch_boundaries() -> None:
    source = shapes()
    # 40 images, batches of 16: step 2 straddles epochs 0 and 1, step 3 lies in epoch 1.
    from_start = list(islice(source.train_batches(0, 16), 6))
    for step in (2, 3, 5):
        assert_same(from_start[step], batch_at(shapes(), step, 16, start=step))
    # A fresh permutation per epoch: epoch 1 is not epoch 0 replayed.
    epoch0 = torch.cat([b.labels for b in islice(source.train_batches(0, 8), 5)])
    epoch1 = torch.cat([b.labels for b in islice(source.train_batches(5, 8), 5)])
    assert sorted(epoch0.tolist()) == sorted(epoch1.tolist())
    assert not torch.equal(epoch0, epoch1)


def test_epoch_order_visits_every_index_once_per_epoch() -> None:
    order = EpochOrder(10, seed=3)
    seen = torch.cat([order.indices(step, 4) for step in range(5)])  # 20 positions = 2 epochs
    assert sorted(seen[:10].tolist()) == list(range(10))
    assert sorted(seen[10:].tolist()) == list(range(10))


def test_shapes_masks_match_labels_and_background_dominates() -> None:
    source = shapes(num_classes=MAX_CLASSES, val_size=64)
    for batch in [source.probe_batch(64), batch_at(source, 0, 32)]:
        assert batch.images.shape == (len(batch), 3, 32, 32) and batch.masks.shape == (len(batch), 32, 32)
        for mask, label in zip(batch.masks, batch.labels):
            values = mask[mask != 0].unique().tolist()
            assert values == [int(label) + 1]
        background = (batch.masks == 0).float().mean(dim=(1, 2))
        assert background.min() >= 0.6 and background.mean() >= 0.7
    assert set(source.probe_batch(64).labels.tolist()) == set(range(MAX_CLASSES))


def test_shapes_are_normalised_and_val_pass_is_fixed() -> None:
    source = shapes(val_size=24)
    images = torch.cat([b.images for b in islice(source.train_batches(0, 20), 2)])
    assert images.mean().abs() < 0.3 and 0.7 < images.std() < 1.3
    val = list(source.val_batches(10))
    assert [len(b) for b in val] == [10, 10, 4]
    assert_same(val[0], source.probe_batch(10))
    assert_same(val[1], list(source.val_batches(10))[1])


def test_shapes_rejects_too_many_classes() -> None:
    with pytest.raises(ValueError, match=f"at most|2 to {MAX_CLASSES}"):
        shapes(num_classes=MAX_CLASSES + 1)


def test_shape_kinds_in_the_config_match_the_generator() -> None:
    assert SHAPE_KINDS == SHAPE_NAMES
    assert DataConfig(num_classes=3).shape_kinds == SHAPE_NAMES[:3]
    assert DataConfig(num_classes=2, shapes=["star", "bar"]).shape_kinds == ("star", "bar")


def test_shapes_default_draw_is_the_original_data_set() -> None:
    # The knobs' defaults draw exactly the original parameters: same seed, same images as before
    # (the pinned values are those of the generator before the knobs existed).
    params, labels = draw_parameters(64, 6, seed=11)
    assert labels[:8].tolist() == [1, 4, 2, 0, 3, 1, 5, 1]
    assert params[0, :4].tolist() == pytest.approx([0.3554, 0.3372, 0.2780, -0.2896], abs=1e-4)
    assert float(params.sum()) == pytest.approx(496.633, abs=1e-3)
    assert torch.equal(draw_parameters(64, 6, seed=11, kinds=SHAPE_NAMES[:6], object_area=(0.10, 0.30))[0], params)
    easy, easy_labels = draw_parameters(64, 6, seed=11, rotation=0.0, colours="light_on_dark")
    assert torch.equal(easy_labels, labels) and not torch.equal(easy, params)


def test_shapes_classes_are_the_listed_kinds_in_order() -> None:
    # Upright bars are wide and flat, discs are round: class 0 must be the bar, class 1 the disc.
    source = shapes(num_classes=2, shapes=["bar", "disc"], rotation=0.0, object_area=(0.2, 0.3), val_size=32)
    batch = source.probe_batch(32)
    for mask, label in zip(batch.masks, batch.labels):
        rows, cols = (mask > 0).nonzero(as_tuple=True)
        height, width = int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1
        if int(label) == 0:
            assert width >= 2 * height
        else:
            assert abs(width - height) <= 1
        assert set(mask[mask > 0].tolist()) == {int(label) + 1}


def test_shapes_upright_and_object_area() -> None:
    params, _ = draw_parameters(200, 8, seed=2, rotation=0.0)
    assert torch.all(params[:, ANGLE] == 0)
    source = shapes(num_classes=6, object_area=(0.2, 0.35), val_size=128)
    covered = (source.probe_batch(128).masks > 0).float().mean(dim=(1, 2))
    # Pixelised areas, and a large object near the edge loses a sliver: a little slack either side.
    assert covered.min() > 0.15 and covered.max() < 0.4 and 0.22 < covered.mean() < 0.33


def test_shapes_light_on_dark_object_is_brighter_than_its_background_in_every_channel() -> None:
    source = shapes(colours="light_on_dark", val_size=64)
    batch = source.probe_batch(64)
    for image, mask in zip(batch.images, batch.masks):
        obj, background = image[:, mask > 0], image[:, mask == 0]
        # Normalisation is a per-channel affine map with a positive scale: order is preserved.
        assert torch.all(obj.min(dim=1).values > background.max(dim=1).values)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"shapes": ["disc", "ring"]}, "shapes lists 2 kinds but num_classes is 6"),
        ({"shapes": ["disc", "disc", "ring", "bar", "star", "cross"]}, "lists a kind twice"),
        ({"shapes": ["disc", "blob", "ring", "bar", "star", "cross"]}, "'disc', 'square'"),
        ({"object_area": (0.3, 0.6)}, "object_area must satisfy"),
        ({"object_area": (0.3, 0.2)}, "object_area must satisfy"),
        ({"rotation": 1.5}, "less than or equal to 1"),
        ({"colours": "pastel"}, "'random' or 'light_on_dark'"),
    ],
)
def test_bad_shapes_settings_are_refused(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DataConfig(num_classes=6, **overrides)


# --- tiny real data sets in their on-disk formats ------------------------------------------


def write_cifar(root: Path, name: str, per_file: int = 4) -> None:
    rng = np.random.default_rng(0)
    num_classes = 10 if name == "cifar10" else 100
    label_key = "labels" if name == "cifar10" else "fine_labels"

    def dump(path: Path, obj: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps(obj))

    def batch(offset: int) -> dict:
        data = rng.integers(0, 256, size=(per_file, 3072), dtype=np.uint8)
        return {"data": data, label_key: [(offset + i) % num_classes for i in range(per_file)]}

    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        for i in range(1, 6):
            dump(folder / f"data_batch_{i}", batch(i * per_file))
        dump(folder / "test_batch", batch(0))
        dump(folder / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    else:
        folder = root / "cifar-100-python"
        dump(folder / "train", batch(0))
        dump(folder / "test", batch(0))
        dump(folder / "meta", {"fine_label_names": [f"c{i}" for i in range(100)]})


def write_image_tree(root: Path, classes=("ant", "bee", "cat"), per_class: int = 3, val_classes=None) -> None:
    rng = np.random.default_rng(1)
    for split, names, count in (("train", classes, per_class), ("val", val_classes or classes, 2)):
        for c in names:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 256, size=(20 + i, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")


@pytest.mark.parametrize("name, num_classes, train_len", [("cifar10", 10, 20), ("cifar100", 100, 4)])
def test_cifar_loaders_read_torchvision_format(tmp_path: Path, name: str, num_classes: int, train_len: int) -> None:
    write_cifar(tmp_path, name)
    cfg = DataConfig(name=name, root=str(tmp_path), num_workers=0)
    check_data(cfg)
    source = build_data(cfg, img_size=16, seed=0, device=CPU)
    assert source.num_classes == num_classes and not source.has_masks
    batch = batch_at(source, 0, 6)
    assert batch.images.shape == (6, 3, 16, 16) and batch.images.dtype == torch.float32
    assert batch.masks is None
    probe = source.probe_batch(4)
    assert probe.labels.tolist() == [0, 1, 2, 3]  # the test split, in file order
    assert_same(probe, next(source.val_batches(4)))
    # One epoch of training visits each training image once.
    labels = torch.cat([b.labels for b in islice(source.train_batches(0, 2), train_len // 2)])
    assert len(labels) == train_len


def test_real_data_resume_is_exact_and_independent_of_workers(tmp_path: Path) -> None:
    write_cifar(tmp_path, "cifar10")
    cfg = DataConfig(name="cifar10", root=str(tmp_path), num_workers=0)
    source = build_data(cfg, img_size=32, seed=5, device=CPU)
    from_start = list(islice(source.train_batches(0, 8), 4))  # 20 images: steps 2 and 3 cross an epoch
    for step in (2, 3):
        assert_same(from_start[step], batch_at(source, step, 8, start=step))
    with_workers = build_data(cfg.model_copy(update={"num_workers": 2}), img_size=32, seed=5, device=CPU)
    assert_same(from_start[3], batch_at(with_workers, 3, 8, start=3))
    # Augmentation is random per sample: a different seed gives different crops/flips of the same data.
    other = build_data(cfg, img_size=32, seed=6, device=CPU)
    assert not torch.equal(from_start[0].images, batch_at(other, 0, 8).images)


def test_real_data_leaves_the_global_rng_alone(tmp_path: Path) -> None:
    write_cifar(tmp_path, "cifar10")
    source = build_data(DataConfig(name="cifar10", root=str(tmp_path), num_workers=0), img_size=32, seed=0, device=CPU)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    batch_at(source, 0, 8)
    assert torch.equal(torch.rand(3), expected)


def test_imagefolder_loads_a_png_tree_with_train_class_indices(tmp_path: Path) -> None:
    write_image_tree(tmp_path, val_classes=("bee", "cat"))  # val lacks 'ant': labels must still follow train
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), num_workers=0)
    check_data(cfg)
    source = build_data(cfg, img_size=16, seed=0, device=CPU)
    assert source.num_classes == 3
    batch = batch_at(source, 0, 4)
    assert batch.images.shape == (4, 3, 16, 16)
    probe = source.probe_batch(4)
    assert probe.images.shape == (4, 3, 16, 16)
    assert probe.labels.tolist() == [1, 1, 2, 2]
    assert_same(batch_at(source, 3, 4), batch_at(source, 3, 4, start=3))


# --- preflight ------------------------------------------------------------------------------


def test_check_data_accepts_shapes_without_a_root() -> None:
    check_data(DataConfig(name="shapes"))


def test_check_data_names_the_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError, match=f"cifar10: no directory {missing}"):
        check_data(DataConfig(name="cifar10", root=str(missing)))
    with pytest.raises(DatasetNotFoundError, match="data.root is not set"):
        check_data(DataConfig(name="imagefolder"))


def test_check_data_names_what_the_layout_lacks(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match=f"no 'cifar-10-batches-py' under {tmp_path}; put torchvision"):
        check_data(DataConfig(name="cifar10", root=str(tmp_path)))
    write_cifar(tmp_path, "cifar10")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetNotFoundError, match="missing data_batch_3 in"):
        check_data(DataConfig(name="cifar10", root=str(tmp_path)))
    with pytest.raises(DatasetNotFoundError, match="no 'cifar-100-python'"):
        check_data(DataConfig(name="cifar100", root=str(tmp_path)))
    (tmp_path / "images" / "train" / "ant").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match=f"no 'val' directory under {tmp_path / 'images'}"):
        check_data(DataConfig(name="imagefolder", root=str(tmp_path / "images")))


def test_check_data_expands_env_vars_and_names_a_missing_one(tmp_path: Path, monkeypatch) -> None:
    write_image_tree(tmp_path / "imgs")
    monkeypatch.setenv("VIT_TEST_DATA", str(tmp_path))
    check_data(DataConfig(name="imagefolder", root="${VIT_TEST_DATA}/imgs"))
    monkeypatch.delenv("VIT_TEST_DATA")
    with pytest.raises(DatasetNotFoundError, match="environment variable VIT_TEST_DATA, which is not set"):
        check_data(DataConfig(name="imagefolder", root="${VIT_TEST_DATA}/imgs"))


# --- s3 ---------------------------------------------------------------------------------------


@pytest.fixture
def s3_bucket(tmp_path: Path, monkeypatch):
    """A moto-mocked bucket 'data' holding a tiny image tree under imagenet-tiny/."""
    from moto import mock_aws

    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "VIT_DATA_CACHE": str(tmp_path / "cache"),
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    write_image_tree(tmp_path / "tree")
    with mock_aws():
        import boto3

        client = boto3.client("s3")
        client.create_bucket(Bucket="data")
        for path in sorted((tmp_path / "tree").rglob("*.png")):
            client.upload_file(str(path), "data", f"imagenet-tiny/{path.relative_to(tmp_path / 'tree')}")
        yield client


def test_s3_check_data_lists_the_prefix(s3_bucket) -> None:
    check_data(DataConfig(name="imagefolder", root="s3://data/imagenet-tiny/"))
    with pytest.raises(DatasetNotFoundError, match="no objects under s3://data/elsewhere/train/"):
        check_data(DataConfig(name="imagefolder", root="s3://data/elsewhere"))
    with pytest.raises(DatasetNotFoundError, match=r"cannot list s3://missing-bucket/x \(NoSuchBucket\)"):
        check_data(DataConfig(name="imagefolder", root="s3://missing-bucket/x"))


def test_s3_root_syncs_once_to_the_cache_and_loads(s3_bucket, tmp_path: Path) -> None:
    from trainers.data.s3sync import SYNC_MARKER, sync_prefix

    cfg = DataConfig(name="imagefolder", root="s3://data/imagenet-tiny", num_workers=0)
    source = build_data(cfg, img_size=16, seed=0, device=CPU)
    local = tmp_path / "cache" / "data" / "imagenet-tiny"
    assert len(list(local.rglob("*.png"))) == 9 + 6
    assert source.num_classes == 3 and batch_at(source, 0, 4).images.shape == (4, 3, 16, 16)

    # With the marker present, a later trial does not touch the bucket at all.
    s3_bucket.delete_object(Bucket="data", Key="imagenet-tiny/train/ant/0.png")
    assert sync_prefix(cfg.root) == local and (local / "train" / "ant" / "0.png").exists()

    # An interrupted sync (no marker) fetches what is missing or has the wrong size.
    (local / SYNC_MARKER).unlink()
    (local / "train" / "bee" / "1.png").unlink()
    (local / "val" / "cat" / "0.png").write_bytes(b"truncated")
    sync_prefix(cfg.root)
    original = tmp_path / "tree"
    for rel in ("train/bee/1.png", "val/cat/0.png"):
        assert (local / rel).read_bytes() == (original / rel).read_bytes()
    assert (local / SYNC_MARKER).exists()


def test_s3_concurrent_syncs_on_one_node_do_not_race(s3_bucket, tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from trainers.data.s3sync import sync_prefix

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(sync_prefix, ["s3://data/imagenet-tiny"] * 3))
    local = tmp_path / "cache" / "data" / "imagenet-tiny"
    assert results == [local] * 3
    synced = sorted(p.relative_to(local) for p in local.rglob("*.png"))
    assert synced == sorted(p.relative_to(tmp_path / "tree") for p in (tmp_path / "tree").rglob("*.png"))
    assert not list(local.rglob("*.part"))
