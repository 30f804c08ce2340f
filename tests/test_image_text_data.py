"""Image-text data for CLIP: WebDataset shards (local and s3://) and a CSV, written here in their formats."""

from __future__ import annotations

import io
import math
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from trainers.config import DataConfig, TrainConfig
from trainers.data import DatasetNotFoundError, build_data, check_data

CPU = torch.device("cpu")


def _jpeg(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def _val_folder(root: Path) -> Path:
    for name, colour in (("red_thing", (200, 0, 0)), ("blue_thing", (0, 0, 200))):
        (root / "val" / name).mkdir(parents=True)
        for i in range(2):
            (root / "val" / name / f"{i}.jpg").write_bytes(_jpeg(colour))
    return root / "val"


def _shards(folder: Path, count: int = 2, per_shard: int = 3) -> list[str]:
    folder.mkdir(parents=True)
    captions = []
    for s in range(count):
        with tarfile.open(folder / f"shard-{s:04d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"{s:04d}{i:04d}"
                caption = f"caption {key}"
                captions.append(caption)
                for name, data in ((f"{key}.jpg", _jpeg((10 * i, 0, 0))), (f"{key}.txt", caption.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return captions


def test_webdataset_shards_give_captioned_batches_by_step(tmp_path: Path) -> None:
    captions = _shards(tmp_path / "shards")
    cfg = DataConfig(name="webdataset", root=str(tmp_path / "shards"), val_root=str(_val_folder(tmp_path)), num_workers=0)
    check_data(cfg)
    source = build_data(cfg, img_size=16, seed=0, device=CPU)
    batch = next(source.train_batches(0, 4))
    assert batch.images.shape == (4, 3, 16, 16) and len(batch.captions) == 4
    assert set(batch.captions) <= set(captions) and (batch.labels == -1).all()
    # Step-addressed: the batch of step 1 is the same whether the run started at 0 or at 1.
    from_zero = list(zip(range(2), source.train_batches(0, 4)))[1][1]
    assert next(source.train_batches(1, 4)).captions == from_zero.captions
    assert source.class_names == ["blue thing", "red thing"] and source.num_classes == 2
    assert len(source.probe_batch(4)) == 4


def test_csv_pairs(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    rows = ["image,caption"]
    for i in range(3):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(_jpeg((0, 80 * i, 0)))
        rows.append(f"img/{i}.jpg,a green square number {i}")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    cfg = DataConfig(name="csv", root=str(tmp_path / "pairs.csv"), val_root=str(_val_folder(tmp_path)), num_workers=0)
    source = build_data(cfg, img_size=16, seed=0, device=CPU)
    batch = next(source.train_batches(0, 3))
    assert sorted(batch.captions) == [f"a green square number {i}" for i in range(3)]


def test_image_text_data_needs_a_val_root_and_clip_needs_captions(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="val_root"):
        TrainConfig(objective="clip", data=DataConfig(name="webdataset", root="x"))
    with pytest.raises(ValueError, match="needs captions"):
        TrainConfig(objective="clip", data=DataConfig(name="cifar10", root="x"))
    with pytest.raises(ValueError, match="class labels"):
        TrainConfig(objective="supervised", data=DataConfig(name="csv", root="x", val_root="y"))
    empty = DataConfig(name="webdataset", root=str(tmp_path), val_root=str(tmp_path))
    with pytest.raises(DatasetNotFoundError, match="shards"):
        check_data(empty)


def test_webdataset_shards_from_s3(tmp_path: Path, s3_client, monkeypatch) -> None:
    monkeypatch.setenv("VIT_DATA_CACHE", str(tmp_path / "cache"))
    _shards(tmp_path / "shards", count=1)
    val = _val_folder(tmp_path)
    s3_client.create_bucket(Bucket="data")
    for path in (tmp_path / "shards").iterdir():
        s3_client.upload_file(str(path), "data", f"shards/{path.name}")
    for path in val.rglob("*.jpg"):
        s3_client.upload_file(str(path), "data", f"val/{path.relative_to(val).as_posix()}")
    cfg = DataConfig(name="webdataset", root="s3://data/shards", val_root="s3://data/val", num_workers=0)
    check_data(cfg)
    source = build_data(cfg, img_size=16, seed=0, device=CPU)
    assert len(next(source.train_batches(0, 2)).captions) == 2
    assert source.class_names == ["blue thing", "red thing"]


def test_dino_on_image_text_shards_trains_and_skips_the_knn_without_labelled_training_images(tmp_path: Path) -> None:
    from trainers.config import DinoConfig, ModelConfig, OptimConfig, ProbeConfig
    from trainers.loop import Trainer

    from trainers.probes import names
    from trainers.tracking import MemoryTracker

    _shards(tmp_path / "shards")
    cfg = TrainConfig(
        objective="dino", steps=2, log_every=1,
        model=ModelConfig(size="micro", img_size=16, patch_size=8, num_registers=1),
        data=DataConfig(name="webdataset", root=str(tmp_path / "shards"), val_root=str(_val_folder(tmp_path)), num_workers=0),
        # Probes on (the teacher, on the val folder's 4 images), as a shipped spec runs them.
        optim=OptimConfig(batch_size=2), probe=ProbeConfig(every=1, batch_size=4),
        dino=DinoConfig(head_prototypes=16, head_hidden_dim=16, head_bottleneck_dim=8, local_crops=1, local_crop_size=8),
    )
    trainer, tracker = Trainer(cfg, CPU), MemoryTracker()
    before = [p.detach().clone() for p in trainer.model.parameters()]
    assert trainer.fit(tracker) == {}  # no k-NN bank, so no evaluation metrics
    # It trained: a finite loss at each step, the student's weights moved, the teacher was probed.
    losses = tracker.history(names.TRAIN_LOSS)
    assert [s for s, _ in losses] == [1, 2] and all(math.isfinite(v) for _, v in losses)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    assert [s for s, _ in tracker.history(names.outlier_frac(names.OUTPUT))] == [1, 2]
    assert not any(key.startswith("val/") for _, key, _ in tracker.metrics)
