"""Class-labelled shards: the writer round trip, step-addressed reads and exact resume, the
device-decode path run on the CPU (torchcodec, per-image CPU fallback for PNG/WebP/CMYK/broken
members, one batched crop), uint8 travel with on-device normalisation, streaming from the
loopback S3 server by concurrent ranged GETs, and `bench data`."""

from __future__ import annotations

import json
import tarfile
import warnings
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainers.config import DataConfig
from trainers.data import DatasetNotFoundError, build_data, check_data
from trainers.data.shard_store import open_split
from trainers.data.crops import CropPlan
from trainers.data.shards import ShardImages, main as shards_main
from trainers.data.tar_index import INDEX_SUFFIX, scan_members

CPU = torch.device("cpu")
CLASSES = ("ant", "bee", "cat")


def write_jpeg_tree(root: Path, per_class: int = 4, png_too: bool = False) -> None:
    """train/<class>/*.jpg (3 per class in val), real JPEGs of different sizes; one PNG if asked."""
    rng = np.random.default_rng(7)
    for split, count in (("train", per_class), ("val", 3)):
        for c in CLASSES:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                coarse = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
                picture = Image.fromarray(coarse).resize((40 + 4 * i, 30 + 2 * i), Image.BICUBIC)
                picture.save(root / split / c / f"{i}.jpg", quality=90)
    if png_too:
        smooth = Image.fromarray(rng.integers(0, 256, size=(5, 6, 3), dtype=np.uint8)).resize((24, 20), Image.BICUBIC)
        smooth.save(root / "train" / "ant" / "z.png")


PLAN = CropPlan.single(16)


def shard_images(root, split: str = "train", on_device: bool = False) -> ShardImages:
    return ShardImages(open_split(str(root), split), img_size=16, plan=PLAN, decode_on_device=on_device)


def batch_at(source, step: int, batch_size: int, start: int = 0):
    return next(islice(source.train_batches(start, batch_size), step - start, None))


def assert_same(a, b) -> None:
    torch.testing.assert_close(a.images, b.images, rtol=0, atol=0)
    assert torch.equal(a.labels, b.labels)


def assert_close_pixels(a: torch.Tensor, b: torch.Tensor, mean: float = 2.0) -> None:
    """The worker's cut (antialiased bilinear) against the device's batched roi_align cut: the same
    boxes, a slightly different filter. uint8 levels, or normalised pixels (x 255 * 0.226)."""
    scale = 1.0 if a.dtype == torch.uint8 else 255 * 0.226
    diff = (a.float() - b.float()).abs() * scale
    assert a.shape == b.shape and float(diff.mean()) < mean and float(diff.max()) < 40, (float(diff.mean()), float(diff.max()))


@pytest.fixture
def sharded(tmp_path: Path) -> Path:
    write_jpeg_tree(tmp_path / "tree")
    assert shards_main(["write", str(tmp_path / "tree"), str(tmp_path / "shards"), "--shard-size", "5"]) == 0
    return tmp_path / "shards"


def shards_source(root: str, seed: int = 0, **overrides):
    cfg = DataConfig(name="shards", root=root, **{"num_workers": 0, **overrides})
    return build_data(cfg, img_size=16, seed=seed, device=CPU)


def test_writer_round_trips_the_jpeg_bytes_and_labels(tmp_path: Path) -> None:
    write_jpeg_tree(tmp_path / "tree", png_too=True)
    shards_main(["write", str(tmp_path / "tree"), str(tmp_path / "out"), "--shard-size", "5"])
    out = tmp_path / "out"
    assert json.loads((out / "classes.json").read_text())["classes"] == list(CLASSES)
    # 13 train images in shards of 5 -> 3 shards, each with an index; 9 val images -> 2.
    assert len(list((out / "train").glob("*.tar"))) == 3 and len(list((out / "val").glob("*.tar"))) == 2
    for split in ("train", "val"):
        expected = [(p, CLASSES.index(c)) for c in CLASSES for p in sorted((tmp_path / "tree" / split / c).iterdir())]
        data = shard_images(out, split, on_device=True)
        assert len(data) == len(expected)
        for i, (path, label) in enumerate(expected):
            encoded, got_label = data.encoded(i)
            assert got_label == label
            if path.suffix == ".jpg":
                assert encoded.numpy().tobytes() == path.read_bytes()  # JPEGs kept bit for bit
            else:  # a PNG is re-encoded as JPEG (quality 95): the same picture, nearly
                from torchcodec.decoders import decode_jpeg

                decoded = decode_jpeg(encoded).permute(1, 2, 0).float()
                original = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).float()
                assert decoded.shape == original.shape and (decoded - original).abs().mean() < 10
    # The index holds the tar's own offsets, and the members are WebDataset jpg + cls pairs.
    shard = out / "train" / "shard-000000.tar"
    members = scan_members(shard)
    index = json.loads(shard.with_name(shard.name + INDEX_SUFFIX).read_text())["samples"]
    assert [[k, *members[k]["jpg"]] for k in members] == [row[:3] for row in index]
    with tarfile.open(shard) as tar:
        assert tar.getnames()[:2] == ["000000000.jpg", "000000000.cls"]
        assert tar.extractfile("000000000.cls").read() == b"0"


def test_shards_batches_are_step_addressed_and_resume_exactly(sharded: Path) -> None:
    source = shards_source(str(sharded), seed=3)
    assert source.num_classes == 3 and source.class_names == list(CLASSES)
    # 12 train images, batches of 5: steps 2 and 4 straddle epochs.
    from_start = list(islice(source.train_batches(0, 5), 5))
    for step in (2, 4):
        assert_same(from_start[step], batch_at(shards_source(str(sharded), seed=3), step, 5, start=step))
    assert from_start[0].images.shape == (5, 3, 16, 16) and from_start[0].images.dtype == torch.float32
    # Whatever the number of workers; decoding on the device gives the same crops but for the filter.
    with_workers = shards_source(str(sharded), seed=3, num_workers=2)
    assert_same(from_start[4], batch_at(with_workers, 4, 5, start=4))
    on_device = shards_source(str(sharded), seed=3, decode="gpu")  # the device path, on the CPU here
    device_batch = batch_at(on_device, 2, 5, start=2)
    assert_same(device_batch, batch_at(shards_source(str(sharded), seed=3, decode="gpu"), 2, 5, start=2))  # resume: exact
    assert torch.equal(device_batch.labels, from_start[2].labels)
    assert_close_pixels(device_batch.images, from_start[2].images)
    assert_close_pixels(source.probe_batch(4).images, on_device.probe_batch(4).images)
    assert_same(source.probe_batch(9), next(source.val_batches(9)))
    # One epoch visits every image once; another seed gives other crops.
    labels = torch.cat([b.labels for b in islice(source.train_batches(0, 4), 3)])
    assert sorted(labels.tolist()) == [0] * 4 + [1] * 4 + [2] * 4
    assert not torch.equal(from_start[0].images, batch_at(shards_source(str(sharded), seed=4), 0, 5).images)


def test_device_decode_path_cuts_the_worker_paths_crops_in_one_batched_op(sharded: Path) -> None:
    """The GPU path is decode(list, device) + one roi_align over an atlas of the share's images.
    Run with device='cpu' through the same functions, it cuts the boxes the worker path cuts (no
    CUDA here: the nvJPEG call itself is untested); each image alone gives the same crops."""
    from trainers.data.collate import Collate, EncodedBatch
    from trainers.data.crops import cut_crops, eval_box

    worker, device = shard_images(sharded), shard_images(sharded, on_device=True)
    keys = [(i, (1000 + i, 2000 + i)) for i in range(len(worker))]  # two positions per image (repeats)
    collate = Collate(PLAN, 16)
    images, labels = (lambda c: (c.images[0], c.targets))(collate(worker.__getitems__(keys)))
    encoded = collate(device.__getitems__(keys))
    assert isinstance(encoded.images, EncodedBatch) and images.dtype == torch.uint8 and images.shape == (24, 3, 16, 16)
    assert all(item.image.ndim == 1 for item in encoded.images.items)  # JPEGs stay bytes for the device decoder
    assert torch.equal(labels, encoded.targets) and labels.tolist()[:2] == [labels[0].item()] * 2
    assert_close_pixels(encoded.images.decode(CPU)[0], images)
    # Batched, the crops equal those of each image cut alone (up to the atlas offset's float rounding).
    from trainers.data.decode import decode_cpu

    pictures = [decode_cpu(worker.encoded(i)[0]) for i in range(4)]
    boxes = np.array([eval_box(p.shape[1], p.shape[2]) for p in pictures])
    flips = np.array([False, True, False, True])
    together = cut_crops(pictures, [0, 1, 2, 3], boxes, flips, 16)
    alone = torch.cat([cut_crops([p], [0], boxes[i : i + 1], flips[i : i + 1], 16) for i, p in enumerate(pictures)])
    assert (together.int() - alone.int()).abs().max() <= 1


def write_member_shard(folder: Path, members: list[tuple[str, bytes, int]]) -> None:
    """One shard with the given image members (name, bytes, label) and its index, as any writer might."""
    from trainers.data.shard_writer import add_member
    from trainers.data.tar_index import write_index

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "shard-000000.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data, label in members:
            add_member(tar, name, data)
            add_member(tar, name.rsplit(".", 1)[0] + ".cls", str(label).encode())
    write_index(path)


def encoded_picture(fmt: str, mode: str = "RGB", **options) -> tuple[bytes, np.ndarray]:
    import io

    rng = np.random.default_rng(3)
    picture = Image.fromarray(rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)).resize((28, 20), Image.BICUBIC)
    out = io.BytesIO()
    picture.convert(mode).save(out, format=fmt, **options)
    return out.getvalue(), np.array(picture)


def test_members_nvjpeg_cannot_take_are_decoded_on_the_cpu_one_image_at_a_time(tmp_path: Path) -> None:
    """PNG, WebP and CMYK JPEG members go to the CPU decoder for that image only; progressive and
    grayscale JPEGs go to the device; an unreadable member becomes grey with a warning, and the
    batch goes on."""
    from trainers.data.collate import Collate
    from trainers.data.decode import nvjpeg_decodable

    members = {
        "a.jpg": encoded_picture("JPEG", quality=95), "b.png": encoded_picture("PNG"),
        "c.webp": encoded_picture("WEBP", lossless=True), "d.jpg": encoded_picture("JPEG", "CMYK", quality=95),
        "e.jpg": encoded_picture("JPEG", quality=95, progressive=True), "f.jpg": encoded_picture("JPEG", "L"),
        "g.jpg": (b"\xff\xd8\xff\xe0 not really a jpeg", None),
        "h.jpg": (encoded_picture("JPEG", quality=95)[0][:400], None),  # headers fine, data cut short
    }
    assert [nvjpeg_decodable(data) for data, _ in members.values()] == [True, False, False, False, True, True, False, True]
    write_member_shard(tmp_path / "train", [(name, data, i) for i, (name, (data, _)) in enumerate(members.items())])
    keys = [(i, (100 + i,)) for i in range(len(members))] + [(i, None) for i in range(len(members))]
    on_device = ShardImages(open_split(str(tmp_path), "train"), img_size=16, plan=PLAN, decode_on_device=True)
    with pytest.warns(RuntimeWarning, match="cannot decode .*shard-000000.tar.*grey image"):
        samples = on_device.__getitems__(keys)
    decoded_in_worker = [s.image.ndim == 3 for s in samples[: len(members)]]
    assert decoded_in_worker == [False, True, True, True, False, False, True, False]
    # Each fallback picture is the picture (lossless PNG/WebP exactly; CMYK through libjpeg's conversion).
    for name, s in zip(members, samples):
        original = members[name][1]
        if s.image.ndim == 3 and original is not None:
            got = s.image.permute(1, 2, 0).numpy().astype(float)
            assert got.shape == original.shape and np.abs(got - original).mean() < (1 if name[-3:] != "jpg" else 12), name
    collate = Collate(PLAN, 16)
    # The truncated JPEG fails the device decoder's batched call: image by image then, and that
    # one on the CPU, where it cannot be read either: grey, and the rest of the batch decodes.
    with pytest.warns(RuntimeWarning) as caught:
        train = collate(samples[: len(members)]).images.decode(CPU)[0]
    said = [str(w.message) for w in caught]
    assert any("JPEG decoder rejected" in m and "decoding it on the CPU" in m for m in said)
    assert any("cannot decode" in m and "grey image" in m for m in said)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        evaluation = collate(samples[len(members) :]).images.decode(CPU)[0]
    assert train.shape == evaluation.shape == (len(members), 3, 16, 16)
    assert [int(e.float().std()) == 0 for e in evaluation] == [False] * 6 + [True, True]  # grey, the batch whole
    worker = ShardImages(open_split(str(tmp_path), "train"), img_size=16, plan=PLAN, decode_on_device=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        crops = collate(worker.__getitems__(keys[: len(members)])).images[0]
    assert_close_pixels(crops, train)


def test_uint8_travel_with_normalisation_on_the_device_matches_the_float_path(tmp_path: Path) -> None:
    """ImageFolder now sends uint8 and normalises after the copy; the old float path
    (ToTensor + Normalize in the worker) gives the same tensors."""
    from torchvision import transforms

    from trainers.data.real import IMAGENET_STATS

    write_jpeg_tree(tmp_path)
    source = build_data(DataConfig(name="imagefolder", root=str(tmp_path), num_workers=0), img_size=16, seed=0, device=CPU)
    old = transforms.Compose([
        transforms.Resize(round(16 / 0.875)), transforms.CenterCrop(16), transforms.ToTensor(),
        transforms.Normalize(*IMAGENET_STATS),
    ])
    paths = [p for c in CLASSES for p in sorted((tmp_path / "val" / c).iterdir())]
    expected = torch.stack([old(Image.open(p).convert("RGB")) for p in paths])
    probe = source.probe_batch(len(paths))
    assert probe.images.dtype == torch.float32
    torch.testing.assert_close(probe.images, expected, rtol=0, atol=1e-6)
    # Training batches too: same crops as before (seeded per sample), only the normalisation moved.
    batch = batch_at(source, 0, 4)
    assert batch.images.min() < -1.5 and batch.images.max() > 1.5


def test_check_data_names_what_a_shard_root_lacks(tmp_path: Path, sharded: Path) -> None:
    check_data(DataConfig(name="shards", root=str(sharded)))
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match="no \\*.tar shards under .*empty/train"):
        check_data(DataConfig(name="shards", root=str(tmp_path / "empty")))


def test_trainer_trains_on_shards(sharded: Path) -> None:
    from trainers.config import ModelConfig, OptimConfig, ProbeConfig, TrainConfig
    from trainers.loop import Trainer

    from trainers.probes import names
    from trainers.tracking import MemoryTracker

    cfg = TrainConfig(
        model=ModelConfig(size="micro", img_size=16, patch_size=4, num_registers=2),
        data=DataConfig(name="shards", root=str(sharded), num_workers=0),
        optim=OptimConfig(batch_size=4), probe=ProbeConfig(every=1, batch_size=4), steps=2, eval_every=2, log_every=1,
    )
    tracker = MemoryTracker()
    metrics = Trainer(cfg, CPU).fit(tracker)
    assert np.isfinite(metrics["val/loss"]) and metrics["val/loss"] > 0
    assert [s for s, _ in tracker.history(names.TRAIN_LOSS)] == [1, 2]
    # Probes on the shards' validation JPEGs at each step, tables and the final figures.
    assert [s for s, _ in tracker.history(names.outlier_frac(names.OUTPUT))] == [1, 2]
    assert f"{names.artifact_dir(2)}/{names.NORM_HIST_FIGURE}" in tracker.files


@pytest.mark.slow
def test_shards_stream_from_s3_by_ranged_gets_without_a_copy(s3, s3_client, sharded: Path, tmp_path: Path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("VIT_DATA_CACHE", str(cache))
    s3_client.create_bucket(Bucket="data")
    for path in sorted(sharded.rglob("*")):
        if path.is_file():
            s3_client.upload_file(str(path), "data", f"in1k-tiny/{path.relative_to(sharded)}")
    del s3.requests[:]
    root = "s3://data/in1k-tiny"
    check_data(DataConfig(name="shards", root=root))
    remote = shards_source(root, seed=3)
    local = shards_source(str(sharded), seed=3)
    for step in (0, 3):
        assert_same(batch_at(local, step, 5, start=step), batch_at(remote, step, 5, start=step))
    assert_same(local.probe_batch(6), remote.probe_batch(6))
    # Every read of a shard is a ranged GET of part of it (coalesced neighbours at most), never the whole file.
    shard_gets = [r for r in s3.requests if r.method == "GET" and r.path.endswith(".tar")]
    assert shard_gets and all(r.range and r.range.startswith("bytes=") for r in shard_gets)
    fetched = sum(int(b) - int(a) + 1 for a, b in (r.range[6:].split("-") for r in shard_gets))
    images_read = 2 * 5 + 6
    total = sum(p.stat().st_size for p in sharded.rglob("*.tar"))
    assert len(shard_gets) <= images_read and fetched < total
    assert not cache.exists()


def test_bench_data_prints_both_rates_and_one_json_line(capsys) -> None:
    from orchestrator.bench.__main__ import main

    argv = ["data", "--images", "24", "--batch", "4", "--steps", "2", "--warmup", "1", "--workers", "0",
            "--img", "16", "--patch", "4", "--device", "cpu", "--json"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["benchmark"] == "data" and result["config"]["decode"] == "cpu"
    assert result["pipeline_imgs_per_s"] > 0 and result["trainer_imgs_per_s"] > 0
    assert result["input_bound"] == (result["pipeline_imgs_per_s"] < result["trainer_imgs_per_s"])
    assert any(line.startswith("pipeline") for line in lines) and any(line.startswith("trainer") for line in lines)


def test_the_plan_says_how_shards_are_read_and_what_resume_guarantees() -> None:
    from orchestrator.spec.plan import describe_data

    line = describe_data(DataConfig(name="shards", root="s3://bucket/in1k"))
    assert "ranged GETs, no copy" in line and "resume exact" in line
    assert "synced once" in describe_data(DataConfig(name="imagefolder", root="s3://bucket/in1k"))


def test_index_command_rebuilds_the_writer_index_and_s3_without_one_is_named(sharded: Path, monkeypatch) -> None:
    import subprocess
    import sys

    indexes = sorted(sharded.rglob("*" + INDEX_SUFFIX))
    written = [p.read_text() for p in indexes]
    for path in indexes:
        path.unlink()
    # Locally a missing index is built from the tar headers on the fly: the same samples.
    assert len(shard_images(sharded, on_device=True)) == 12
    run = subprocess.run(
        [sys.executable, "-m", "trainers.data.shards", "index", str(sharded)], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0 and "indexed 5 shards" in run.stdout
    assert [p.read_text() for p in indexes] == written


@pytest.mark.slow
def test_s3_shards_without_an_index_fail_with_the_command_that_writes_it(s3, s3_client, sharded: Path) -> None:
    s3_client.create_bucket(Bucket="data")
    for path in sorted(sharded.rglob("*")):
        if path.is_file() and not path.name.endswith(INDEX_SUFFIX):
            s3_client.upload_file(str(path), "data", f"noindex/{path.relative_to(sharded)}")
    with pytest.raises(DatasetNotFoundError, match=r"no index s3://data/noindex/train/shard-000000.tar.idx.json.*shards index"):
        shards_source("s3://data/noindex")


def test_local_reads_keep_a_bounded_number_of_shards_open(sharded: Path) -> None:
    data = shard_images(sharded, on_device=True)
    data.shards.files.limit = 2
    first = [data.encoded(i)[0] for i in range(len(data))]  # 3 shards, read in turn
    assert len(data.shards.files) == 2
    assert all(torch.equal(a, data.encoded(i)[0]) for i, a in reversed(list(enumerate(first))))
