"""Real images: CIFAR-10/100 (torchvision's python format) and ImageFolder (ImageNet layout).

Images go through a torch DataLoader. Its batch sampler is step-addressed: for step s it
passes (dataset index, sample seed) pairs, where the indices come from the epoch
permutation (sampling.EpochOrder) and the seeds from (seed, step, position). Each sample's
augmentation runs under its own seed, so the batch for step s is identical whether the
run started at 0 or was resumed at s, and whatever the number of workers.

Images travel as uint8 (PILToTensor, no float conversion in the workers: 4x fewer bytes
through worker queues, pinned memory and the host-to-device copy) and are normalised on
the device, after the copy (timm's prefetcher pattern).
"""

from __future__ import annotations

import copy
from itertools import count
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import datasets, transforms

from .base import Batch
from .layout import class_dirs
from .sampling import EpochOrder, derive_seed, derive_seeds

SampleKey = tuple[int, int]  # (dataset index, augmentation seed)

CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class _FilePresenceMixin:
    """torchvision's CIFAR checks the md5 of every file on each construction. We check
    presence only (layout.check_local_layout ran before): hashing the full set would cost
    every trial seconds, and the tests write tiny sets in the same format."""

    root: str
    base_folder: str
    train_list: list[list[str]]
    test_list: list[list[str]]
    meta: dict[str, str]

    def _check_integrity(self) -> bool:
        return all((Path(self.root) / self.base_folder / f).is_file() for f, _ in self.train_list + self.test_list)

    def _load_meta(self) -> None:
        import pickle

        with open(Path(self.root) / self.base_folder / self.meta["filename"], "rb") as f:
            self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


class _CIFAR10(_FilePresenceMixin, datasets.CIFAR10):
    pass


class _CIFAR100(_FilePresenceMixin, datasets.CIFAR100):
    pass


class _TrainClassesFolder(datasets.ImageFolder):
    """ImageFolder whose class indices come from the train split, so a val split that
    lacks some classes keeps the same label for every class."""

    def __init__(self, root: Path, classes: list[str], transform: Callable[..., Any], allow_empty: bool) -> None:
        self._fixed_classes = classes
        super().__init__(str(root), transform=transform, allow_empty=allow_empty)

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        return self._fixed_classes, {c: i for i, c in enumerate(self._fixed_classes)}


class SeededSamples(Dataset[tuple[torch.Tensor, int]]):
    """Indexed by (index, seed): the augmentation of each sample runs under its own seed."""

    def __init__(self, base: Dataset[tuple[Any, int]]) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: SampleKey) -> tuple[torch.Tensor, int]:
        index, seed = key
        # torchvision's transforms draw from the global CPU generator. Seed only that one
        # (torch.manual_seed would also touch CUDA) and restore it afterwards, so that the
        # caller's RNG stream is untouched when num_workers is 0.
        generator = torch.default_generator
        state = generator.get_state()
        generator.manual_seed(seed)
        try:
            return self.base[index]
        finally:
            generator.set_state(state)


class StepBatchSampler(Sampler[list[SampleKey]]):
    """Infinite batches of (index, seed) keys for steps start_step, start_step + 1, ..."""

    def __init__(self, order: EpochOrder, seed: int, start_step: int, batch_size: int) -> None:
        self.order, self.seed, self.start_step, self.batch_size = order, seed, start_step, batch_size

    def __iter__(self) -> Iterator[list[SampleKey]]:
        for step in count(self.start_step):
            indices = self.order.indices(step, self.batch_size).tolist()
            yield list(zip(indices, derive_seeds(self.batch_size, self.seed, "augment", step)))


def _cifar_transforms(name: str, img_size: int) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """(train, eval) transforms: random crop and flip for training; resize only for evaluation."""
    resize = [transforms.Resize(img_size)] if img_size != 32 else []
    tail = [transforms.PILToTensor()]  # uint8: normalised on the device (RealSource.stats)
    train = transforms.Compose(
        resize
        + [
            transforms.RandomCrop(img_size, padding=img_size // 8, padding_mode="reflect"),
            transforms.RandomHorizontalFlip(),
        ]
        + tail
    )
    return train, transforms.Compose(resize + tail)


def _imagefolder_transforms(img_size: int) -> tuple[Callable[..., Any], Callable[..., Any]]:
    tail = [transforms.PILToTensor()]  # uint8: normalised on the device (RealSource.stats)
    train = transforms.Compose(
        [transforms.RandomResizedCrop(img_size), transforms.RandomHorizontalFlip()] + tail
    )
    val = transforms.Compose(
        [transforms.Resize(round(img_size / 0.875)), transforms.CenterCrop(img_size)] + tail
    )
    return train, val


class RealSource:
    """A DataSource over a map-style train and val dataset of (PIL image, label).

    Image-text data gives (image, caption) pairs for training instead; its batches carry the
    captions and label -1. `reference` is the train split without augmentation (None where the
    training images have no labels): the k-NN evaluation's feature bank."""

    has_masks = False

    def __init__(
        self,
        train: Dataset[tuple[Any, Any]],
        val: Dataset[tuple[Any, int]],
        *,
        num_classes: int,
        seed: int,
        device: torch.device,
        num_workers: int,
        class_names: list[str] | None = None,
        reference: Dataset[tuple[Any, int]] | None = None,
        stats: tuple[Sequence[float], Sequence[float]] = IMAGENET_STATS,
        seeded: bool = True,
        collate: Callable[[list[Any]], Any] | None = None,
        img_size: int | None = None,
    ) -> None:
        """stats: (mean, std) applied on the device to uint8 images. seeded=False: the data sets
        take (index, seed) keys themselves. collate: the loader's collate_fn; it may return
        shards.EncodedBatch (JPEG bytes), decoded on the device at img_size."""
        self.num_classes = num_classes
        self.class_names = class_names or [str(i) for i in range(num_classes)]
        wrap: Callable[[Any], Any] = SeededSamples if seeded else (lambda d: d)
        self.reference = wrap(reference) if reference is not None else None
        self.train, self.val = wrap(train), wrap(val)
        self.collate, self.img_size = collate, img_size
        self.mean = torch.tensor(stats[0], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(stats[1], device=device).view(1, 3, 1, 1)
        self.seed, self.device, self.num_workers = seed, device, num_workers
        self._order = EpochOrder(len(self.train), derive_seed(seed, "real", "order"))
        self._val_loaders: dict[int, DataLoader[Any]] = {}

    def _loader(self, dataset: SeededSamples, batch_sampler: Any) -> DataLoader[Any]:
        workers = self.num_workers
        return DataLoader(
            dataset,
            batch_sampler=batch_sampler,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0,
            collate_fn=self.collate,
            # The loader draws its worker base seed when iterated: take it from a private
            # generator, not from the trainer's global RNG stream.
            generator=torch.Generator().manual_seed(derive_seed(self.seed, "loader")),
        )

    def _on_device(self, images: Any) -> torch.Tensor:
        """float32 normalised images on the device from uint8 CPU images or JPEG bytes."""
        if isinstance(images, torch.Tensor):
            images = images.to(self.device, non_blocking=True)
        else:  # shards.EncodedBatch: decode (nvJPEG on CUDA) and crop on the device
            images = images.decode(self.device, self.img_size)
        if images.dtype != torch.uint8:
            return images
        return images.float().div_(255).sub_(self.mean).div_(self.std)

    def _to_batch(self, images: Any, labels: torch.Tensor | list[str]) -> Batch:
        pixels = self._on_device(images)
        if isinstance(labels, torch.Tensor):
            return Batch(pixels, labels.to(self.device, non_blocking=True))
        # Image-text pairs: the loader collates the captions into a list of strings.
        unlabelled = torch.full((len(labels),), -1, dtype=torch.int64, device=self.device)
        return Batch(pixels, unlabelled, captions=list(labels))

    def train_batches(self, start_step: int, batch_size: int) -> Iterator[Batch]:
        sampler = StepBatchSampler(self._order, self.seed, start_step, batch_size)
        for images, labels in self._loader(self.train, sampler):
            yield self._to_batch(images, labels)

    def reference_batches(self, count: int, batch_size: int) -> Iterator[Batch]:
        if self.reference is None:
            return
        # A fixed, seeded subset of the training images, the same at every evaluation.
        order = EpochOrder(len(self.reference), derive_seed(self.seed, "real", "reference")).permutation(0)
        keys = [(int(i), 0) for i in order[: min(count, len(self.reference))]]
        batches = [keys[s : s + batch_size] for s in range(0, len(keys), batch_size)]
        for images, labels in self._loader(self.reference, batches):
            yield self._to_batch(images, labels)

    def val_batches(self, batch_size: int) -> Iterator[Batch]:
        loader = self._val_loaders.get(batch_size)
        if loader is None:
            n = len(self.val)
            batches = [[(i, 0) for i in range(s, min(s + batch_size, n))] for s in range(0, n, batch_size)]
            loader = self._val_loaders[batch_size] = self._loader(self.val, batches)
        for images, labels in loader:
            yield self._to_batch(images, labels)

    def probe_batch(self, size: int) -> Batch:
        if size > len(self.val):
            raise ValueError(f"probe batch of {size} images is larger than the val split ({len(self.val)} images)")
        samples = [self.val[(i, 0)] for i in range(size)]
        if self.collate is not None:
            return self._to_batch(*self.collate(samples))
        images = torch.stack([s[0] for s in samples])
        labels = torch.tensor([s[1] for s in samples], dtype=torch.int64)
        return self._to_batch(images, labels)


def readable_class_names(folder: Path, classes: list[str]) -> list[str]:
    """Names for zero-shot prompts: classnames.txt in the folder (one per line, in sorted
    folder order, e.g. ImageNet's 'tench' for n01440764) or the folder names, '_' as spaces."""
    listing = folder / "classnames.txt"
    if listing.is_file():
        names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        if len(names) == len(classes):
            return names
    return [c.replace("_", " ") for c in classes]


def build_real(
    name: str, root: Path, *, img_size: int, seed: int, device: torch.device, num_workers: int, augment: bool = True
) -> RealSource:
    """A RealSource for 'cifar10', 'cifar100' or 'imagefolder' at a checked local root.

    augment=False trains on the evaluation transform (DINO crops on the device instead)."""
    if name in CIFAR_STATS:
        train_tf, val_tf = _cifar_transforms(name, img_size)
        cls = _CIFAR10 if name == "cifar10" else _CIFAR100
        train: Any = cls(str(root), train=True, transform=train_tf if augment else val_tf, download=False)
        val: Any = cls(str(root), train=False, transform=val_tf, download=False)
        reference = copy.copy(train)
        reference.transform = val_tf
        class_names = list(train.classes)
    elif name == "imagefolder":
        train_tf, val_tf = _imagefolder_transforms(img_size)
        classes = class_dirs(root / "train")
        train = _TrainClassesFolder(root / "train", classes, train_tf if augment else val_tf, allow_empty=False)
        val = _TrainClassesFolder(root / "val", classes, val_tf, allow_empty=True)
        reference = copy.copy(train)  # shares the file list: no second scan of the folders
        reference.transform = val_tf
        class_names = readable_class_names(root, classes)
    else:
        raise ValueError(f"unknown real data set {name!r}")
    return RealSource(
        train, val, num_classes=len(class_names), seed=seed, device=device, num_workers=num_workers,
        class_names=class_names, reference=reference, stats=CIFAR_STATS[name] if name in CIFAR_STATS else IMAGENET_STATS,
    )
