"""Real images: CIFAR-10/100 (torchvision's python format) and ImageFolder (ImageNet layout),
and the DataSource that every real format (shards, image-text pairs too) shares.

Images go through a torch DataLoader. Its batch sampler is step-addressed: for step s it
passes this rank's sample keys (sampling.share_keys): dataset indices from the epoch
permutation (sampling.EpochOrder) and one seed per output position, from (seed, step,
position in the global batch). Each position's augmentation runs under its own seed, so the
batch for step s is identical whether the run started at 0 or was resumed at s, whatever the
number of loader workers, and rank r's share is rows [r * n, (r + 1) * n) of the one-process
batch: each rank reads and decodes only the images it trains on.

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
from .collate import Collate, Collated, EncodedBatch, Views, uniforms_for
from .crops import CropPlan, views_of_image
from .layout import class_dirs
from .sampling import EpochOrder, SampleKey, derive_seed, share_keys

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


class SeededSamples(Dataset[Any]):
    """Indexed by SampleKey (index, seeds of its output positions, or None): the augmentation of
    each position runs under its own seed.

    plan None: the base data set's own transform under the (single) seed. With a crop plan the
    base transform gives the whole image as uint8 and the plan's crops are cut from it here
    (crops.views_of_image), one set per position; seeds None is the base data set's item as is."""

    def __init__(self, base: Dataset[tuple[Any, Any]], plan: CropPlan | None = None) -> None:
        self.base, self.plan = base, plan

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: SampleKey) -> Any:
        index, seeds = key
        if self.plan is not None and seeds is not None:
            image, target = self.base[index]
            return Views(views_of_image(image, self.plan, uniforms_for(self.plan, seeds)), target, len(seeds))
        # torchvision's transforms draw from the global CPU generator. Seed only that one
        # (torch.manual_seed would also touch CUDA) and restore it afterwards, so that the
        # caller's RNG stream is untouched when num_workers is 0.
        generator = torch.default_generator
        state = generator.get_state()
        generator.manual_seed(seeds[0] if seeds else 0)
        try:
            return self.base[index]
        finally:
            generator.set_state(state)


class StepBatchSampler(Sampler[list[SampleKey]]):
    """Infinite lists of this rank's sample keys for steps start_step, start_step + 1, ...
    (sampling.share_keys: the rank's share of the global batch, each image once)."""

    def __init__(
        self, order: EpochOrder, seed: int, start_step: int, global_batch: int, *, repeats: int = 1, rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.order, self.seed, self.start_step, self.global_batch = order, seed, start_step, global_batch
        self.repeats, self.rank, self.world_size = repeats, rank, world_size

    def __iter__(self) -> Iterator[list[SampleKey]]:
        for step in count(self.start_step):
            yield share_keys(
                self.order, self.seed, step, self.global_batch, repeats=self.repeats, rank=self.rank,
                world_size=self.world_size,
            )


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


def _rgb(image: Any) -> Any:
    return image.convert("RGB")


# With a crop plan, training images arrive whole (as uint8) and the plan's crops are cut from them.
WHOLE_IMAGE = transforms.Compose([transforms.Lambda(_rgb), transforms.PILToTensor()])


class RealSource:
    """A DataSource over map-style train and val datasets read by SampleKey.

    Training batches are this rank's share of the step's global batch (sampling.share_keys).
    Image-text data gives (image, caption) pairs for training instead; its batches carry the
    captions, their tokens (tokenised in the loader workers) and label -1. `reference` is the
    train split read with the evaluation view (None where the training images have no labels):
    the k-NN evaluation's feature bank."""

    has_masks = False

    def __init__(
        self,
        train: Dataset[Any],
        val: Dataset[Any],
        *,
        num_classes: int,
        seed: int,
        device: torch.device,
        num_workers: int,
        class_names: list[str] | None = None,
        reference: Dataset[Any] | None = None,
        stats: tuple[Sequence[float], Sequence[float]] = IMAGENET_STATS,
        plan: CropPlan | None = None,
        collate: Collate | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        """stats: (mean, std) applied on the device to uint8 images. train, val and reference take
        SampleKeys (wrap torchvision data sets in SeededSamples). plan: the training crops; its
        repeats set how many positions each image fills. collate: the loader's collate_fn."""
        self.num_classes = num_classes
        self.class_names = class_names or [str(i) for i in range(num_classes)]
        self.train, self.val, self.reference = train, val, reference
        self.plan = plan
        self.collate = collate or Collate(plan)
        self.mean = torch.tensor(stats[0], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(stats[1], device=device).view(1, 3, 1, 1)
        self.seed, self.device, self.num_workers = seed, device, num_workers
        self.rank, self.world_size = rank, world_size
        self._order = EpochOrder(len(self.train), derive_seed(seed, "real", "order"))  # type: ignore[arg-type]
        self._val_loaders: dict[int, DataLoader[Any]] = {}

    def _loader(self, dataset: Dataset[Any], batch_sampler: Any) -> DataLoader[Any]:
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

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        return images.float().div_(255).sub_(self.mean).div_(self.std)

    def _to_batch(self, collated: Collated, train: bool = False) -> Batch:
        images = collated.images
        if isinstance(images, EncodedBatch):  # JPEG bytes: decode and cut on the device
            images = images.decode(self.device)
        groups = images if isinstance(images, tuple) else (images,)
        pixels = tuple(self._normalise(g) for g in groups)
        views = pixels if train and self.plan is not None else None
        targets = collated.targets
        if isinstance(targets, torch.Tensor):
            return Batch(pixels[0], targets.to(self.device, non_blocking=True), views=views)
        # Image-text pairs: captions, tokenised by the loader's workers.
        unlabelled = torch.full((len(targets),), -1, dtype=torch.int64, device=self.device)
        tokens = None if collated.tokens is None else collated.tokens.to(self.device, non_blocking=True)
        return Batch(pixels[0], unlabelled, captions=list(targets), tokens=tokens, views=views)

    def train_batches(self, start_step: int, batch_size: int) -> Iterator[Batch]:
        repeats = self.plan.repeats if self.plan is not None else 1
        sampler = StepBatchSampler(
            self._order, self.seed, start_step, batch_size, repeats=repeats, rank=self.rank, world_size=self.world_size
        )
        for collated in self._loader(self.train, sampler):
            yield self._to_batch(collated, train=True)

    def reference_batches(self, count: int, batch_size: int) -> Iterator[Batch]:
        if self.reference is None:
            return
        # A fixed, seeded subset of the training images, the same at every evaluation.
        n = len(self.reference)  # type: ignore[arg-type]
        order = EpochOrder(n, derive_seed(self.seed, "real", "reference")).permutation(0)
        keys: list[SampleKey] = [(int(i), None) for i in order[: min(count, n)]]
        batches = [keys[s : s + batch_size] for s in range(0, len(keys), batch_size)]
        for collated in self._loader(self.reference, batches):
            yield self._to_batch(collated)

    def val_batches(self, batch_size: int) -> Iterator[Batch]:
        loader = self._val_loaders.get(batch_size)
        if loader is None:
            n = len(self.val)  # type: ignore[arg-type]
            batches = [[(i, None) for i in range(s, min(s + batch_size, n))] for s in range(0, n, batch_size)]
            loader = self._val_loaders[batch_size] = self._loader(self.val, batches)
        for collated in loader:
            yield self._to_batch(collated)

    def probe_batch(self, size: int) -> Batch:
        n = len(self.val)  # type: ignore[arg-type]
        if size > n:
            raise ValueError(f"probe batch of {size} images is larger than the val split ({n} images)")
        keys: list[SampleKey] = [(i, None) for i in range(size)]
        many = getattr(self.val, "__getitems__", None)
        samples = many(keys) if many is not None else [self.val[k] for k in keys]
        return self._to_batch(self.collate(samples))


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
    name: str, root: Path, *, img_size: int, seed: int, device: torch.device, num_workers: int,
    plan: CropPlan | None = None, rank: int = 0, world_size: int = 1,
) -> RealSource:
    """A RealSource for 'cifar10', 'cifar100' or 'imagefolder' at a checked local root.

    plan: the training crops, cut from the whole image (3-Augment, DINO); None: the data set's
    usual training transform (CIFAR: padded random crop; ImageFolder: RandomResizedCrop)."""
    if name in CIFAR_STATS:
        train_tf, val_tf = _cifar_transforms(name, img_size)
        cls = _CIFAR10 if name == "cifar10" else _CIFAR100
        train: Any = cls(str(root), train=True, transform=WHOLE_IMAGE if plan else train_tf, download=False)
        val: Any = cls(str(root), train=False, transform=val_tf, download=False)
        class_names = list(train.classes)
    elif name == "imagefolder":
        train_tf, val_tf = _imagefolder_transforms(img_size)
        classes = class_dirs(root / "train")
        train = _TrainClassesFolder(root / "train", classes, WHOLE_IMAGE if plan else train_tf, allow_empty=False)
        val = _TrainClassesFolder(root / "val", classes, val_tf, allow_empty=True)
        class_names = readable_class_names(root, classes)
    else:
        raise ValueError(f"unknown real data set {name!r}")
    reference = copy.copy(train)  # shares the file list: no second scan of the folders
    reference.transform = val_tf
    return RealSource(
        SeededSamples(train, plan), SeededSamples(val), num_classes=len(class_names), seed=seed, device=device,
        num_workers=num_workers, class_names=class_names, reference=SeededSamples(reference),
        stats=CIFAR_STATS[name] if name in CIFAR_STATS else IMAGENET_STATS, plan=plan, rank=rank, world_size=world_size,
    )
