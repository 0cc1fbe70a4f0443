"""Datasets for the pipeline: scikit-learn's digits (ships with the dependency, no download) or an ImageFolder tree,
and a deterministic, resumable, rank-sharded batch order.

Digits: 1797 grayscale 8x8 images in [0, 16], split train/val by a stratified, seeded split; each image is scaled to
[0, 1], resized to the model's input size, repeated over its input channels and normalised with the model's mean/std.
ImageFolder: ``root/train/<class>/<image>`` and ``root/val/<class>/<image>`` (ImageNet layout) with timm's transforms.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from hiap.app.runtime import InputError

DIGITS = "digits"
DIGITS_CLASSES = 10
# Precompute the resized digits when they fit in this many floats; larger inputs (224 px RGB) are resized per item.
_PRECOMPUTE_LIMIT = 50_000_000


@dataclass
class DataBundle:
    """Train and validation sets plus what the report says about them."""

    train: Dataset
    val: Dataset
    num_classes: int
    description: str


def describe_source(data: str | None) -> str:
    return DIGITS if data in (None, DIGITS) else str(Path(data).resolve())


def check_imagefolder(root: str | os.PathLike) -> Path:
    """The resolved root of an ImageFolder tree with ``train/`` and ``val/``; InputError naming what is missing."""
    path = Path(root).expanduser()
    if not path.exists():
        raise InputError(f"dataset path {path} does not exist")
    if not path.is_dir():
        raise InputError(f"dataset path {path} is not a directory")
    missing = [split for split in ("train", "val") if not (path / split).is_dir()]
    if missing:
        raise InputError(
            f"dataset path {path} has no {' or '.join(m + '/' for m in missing)} folder; expected the ImageNet layout "
            f"{path}/train/<class>/<image> and {path}/val/<class>/<image>"
        )
    return path.resolve()


def num_classes_of(data: str | None) -> int:
    """Class count of the digits (10) or of an ImageFolder tree (its ``train/`` sub-folders)."""
    if data in (None, DIGITS):
        return DIGITS_CLASSES
    root = check_imagefolder(data)
    classes = [entry for entry in (root / "train").iterdir() if entry.is_dir()]
    if len(classes) < 2:
        raise InputError(f"dataset path {root}/train has {len(classes)} class folder{'s' if len(classes) != 1 else ''}; "
                         "a classifier needs at least two")
    return len(classes)


def model_input_spec(model: nn.Module) -> tuple[int, tuple[int, int], tuple[float, ...], tuple[float, ...]]:
    """(channels, (height, width), mean, std) a timm ViT expects; mean/std from its pretrained config (0.5 default)."""
    patch = model.patch_embed
    channels = patch.proj.in_channels
    pretrained_cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = tuple(pretrained_cfg.get("mean", (0.5,) * channels))
    std = tuple(pretrained_cfg.get("std", (0.5,) * channels))
    if len(mean) != channels:
        mean, std = (sum(mean) / len(mean),) * channels, (sum(std) / len(std),) * channels
    return channels, tuple(patch.img_size), mean, std


class DigitsDataset(Dataset):
    """scikit-learn digits as model inputs ``[C, H, W]`` (float32, normalised) with integer labels.

    Args:
        images: ``[N, 8, 8]`` float tensor in [0, 16]; labels: ``[N]`` int64.
        size: output (height, width); channels: output channels (the gray image repeated).
        mean, std: per-channel normalisation.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, size: tuple[int, int], channels: int,
                 mean: tuple[float, ...], std: tuple[float, ...]):
        self.labels = labels
        self.size = size
        self.channels = channels
        self.mean = torch.tensor(mean, dtype=torch.float32).view(channels, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(channels, 1, 1)
        self.base = images.float() / 16.0
        elements = len(labels) * channels * size[0] * size[1]
        self.cached = self._transform(self.base) if elements <= _PRECOMPUTE_LIMIT else None

    def _transform(self, base: torch.Tensor) -> torch.Tensor:
        """``[N, 8, 8]`` in [0, 1] -> ``[N, C, H, W]`` normalised."""
        resized = F.interpolate(base[:, None], size=self.size, mode="bilinear", align_corners=False)
        return (resized.expand(-1, self.channels, -1, -1) - self.mean) / self.std

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.cached[index] if self.cached is not None else self._transform(self.base[index : index + 1])[0]
        return image, self.labels[index]


def digits_datasets(model: nn.Module, val_fraction: float = 0.2, split_seed: int = 0) -> DataBundle:
    """Stratified train/val split of scikit-learn's digits, shaped for ``model``'s input."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < val_fraction < 1.0:
        raise InputError(f"--val-fraction must lie in (0, 1), got {val_fraction}")
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)
    labels = torch.tensor(digits.target, dtype=torch.int64)
    train_index, val_index = train_test_split(
        list(range(len(labels))), test_size=val_fraction, stratify=digits.target, random_state=split_seed
    )
    channels, size, mean, std = model_input_spec(model)
    make = lambda index: DigitsDataset(images[index], labels[index], size, channels, mean, std)  # noqa: E731
    description = f"scikit-learn digits, {len(train_index)} train / {len(val_index)} val (split seed {split_seed})"
    return DataBundle(make(train_index), make(val_index), DIGITS_CLASSES, description)


def imagefolder_datasets(root: str | os.PathLike, model: nn.Module) -> DataBundle:
    """``root/train`` and ``root/val`` through torchvision's ImageFolder with timm's train / eval transforms."""
    from timm.data import create_transform, resolve_data_config
    from torchvision.datasets import ImageFolder

    path = check_imagefolder(root)
    channels, size, mean, std = model_input_spec(model)
    # The model's own normalisation, one value per input channel (a one-channel model gets the mean of an RGB one).
    config = resolve_data_config({"input_size": (channels, *size), "mean": mean, "std": std}, model=model)
    loader = _image_loader("L" if channels == 1 else "RGB")
    try:
        train = ImageFolder(str(path / "train"), transform=create_transform(**config, is_training=True), loader=loader)
        val = ImageFolder(str(path / "val"), transform=create_transform(**config, is_training=False), loader=loader)
    except (FileNotFoundError, OSError) as error:
        raise InputError(f"cannot read the ImageFolder tree at {path}: {error}") from error
    if train.classes != val.classes:
        raise InputError(f"{path}/train and {path}/val have different class folders")
    description = f"ImageFolder {path}, {len(train)} train / {len(val)} val images, {len(train.classes)} classes"
    return DataBundle(train, val, len(train.classes), description)


class _image_loader:
    """Open an image in the mode the model reads (a one-channel model gets grayscale, whatever the files hold); a
    file that is not a readable image is an InputError naming it, not a PIL traceback from a loader worker."""

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, path: str):
        from PIL import Image, UnidentifiedImageError

        try:
            with open(path, "rb") as handle:
                return Image.open(handle).convert(self.mode)
        except (UnidentifiedImageError, OSError, ValueError) as error:
            raise InputError(f"{path} is not a readable image ({type(error).__name__})") from None


def build_datasets(data: str | None, model: nn.Module, val_fraction: float = 0.2, split_seed: int = 0) -> DataBundle:
    """Digits when ``data`` is None or ``"digits"``, else the ImageFolder tree at ``data``."""
    if data in (None, DIGITS):
        return digits_datasets(model, val_fraction, split_seed)
    return imagefolder_datasets(data, model)


class ShardedBatchSampler(Sampler[list[int]]):
    """Batches of one rank: a fresh permutation per epoch from ``(seed, epoch)``, cut into global batches of
    ``global_batch`` indices, of which rank ``r`` takes slice ``r``. Incomplete global batches are dropped, so every
    rank runs the same number of equally sized steps.

    ``set_epoch(epoch, start_step)`` lets a resumed run continue mid-epoch with exactly the batches it had left.
    """

    def __init__(self, num_samples: int, global_batch: int, *, seed: int, rank: int = 0, world_size: int = 1):
        if global_batch % world_size:
            raise InputError(f"--batch-size {global_batch} is not divisible by the {world_size} processes")
        if num_samples < global_batch:
            raise InputError(f"--batch-size {global_batch} is larger than the training set ({num_samples} images)")
        self.num_samples = num_samples
        self.global_batch = global_batch
        self.local_batch = global_batch // world_size
        self.seed = seed
        self.rank = rank
        self.epoch = 0
        self.start_step = 0

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch = epoch
        self.start_step = start_step

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_step

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator)
        for step in range(self.start_step, self.steps_per_epoch):
            first = step * self.global_batch + self.rank * self.local_batch
            yield order[first : first + self.local_batch].tolist()


def train_loader(dataset: Dataset, sampler: ShardedBatchSampler, workers: int = 0, pin_memory: bool = False) -> DataLoader:
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                      persistent_workers=False)


def eval_loader(dataset: Dataset, batch_size: int, *, rank: int = 0, world_size: int = 1, workers: int = 0,
                pin_memory: bool = False) -> DataLoader:
    """Sequential batches of this rank's share (every ``world_size``-th item starting at ``rank``)."""
    if world_size > 1:
        dataset = Subset(dataset, list(range(rank, len(dataset), world_size)))
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin_memory)
