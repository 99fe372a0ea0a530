"""Data sets, partitioners and a resumable batch order (docs/design.md, "Data").

Only numpy is imported here: devices on small boards never pay for scikit-learn, which ``load_digits`` imports
lazily. Shards on disk are ``mqttfl.ml.shard``. Everything is deterministic given its seed, because a run that
migrates mid-training must replay exactly the batches a run that does not migrate would see (docs/design.md,
"Round").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

__all__ = [
    "BatchOrder",
    "DataSource",
    "Dataset",
    "holdout",
    "label_histogram",
    "load_digits",
    "partition_dirichlet",
    "partition_iid",
    "partition_imbalanced",
    "resize",
    "stratified_split",
    "synthetic_images",
]


class DataSource(Protocol):
    """What a device reads its training batches through (docs/data.md): a sized, indexable set of
    (input, label) rows: a memory-mapped shard (``mqttfl.ml.shard``) or an in-memory :class:`Dataset`."""

    def __len__(self) -> int: ...

    def batch(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``idx`` as (float32 inputs, labels: int64 class indices or float32 targets), in that order."""
        ...

    def labels(self) -> np.ndarray:
        """Every row's label (for the label histogram a device may share)."""
        ...


@dataclass(frozen=True)
class Dataset:
    """Inputs ``x`` (float32, N x C x H x W or N x D) and labels ``y``: class indices (int64, N) or float
    targets (float32, N x K: regression targets, or 0/1 per label for multi-label)."""

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        if self.x.dtype != np.float32:
            raise ValueError(f"Dataset.x must be float32, got {self.x.dtype}")
        if not ((self.y.dtype == np.int64 and self.y.ndim == 1) or (self.y.dtype == np.float32 and self.y.ndim == 2)):
            raise ValueError(f"Dataset.y must be int64 (N,) class indices or float32 (N, K) targets, got "
                             f"{self.y.dtype}{self.y.shape}")
        if self.x.ndim < 2:
            raise ValueError(f"Dataset needs x with ndim >= 2, got {self.x.shape}")
        if len(self.x) != len(self.y):
            raise ValueError(f"Dataset has {len(self.x)} inputs but {len(self.y)} labels")

    def __len__(self) -> int:
        return len(self.y)

    def batch(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.x[idx], self.y[idx]

    def labels(self) -> np.ndarray:
        return self.y

    def subset(self, idx: np.ndarray | Sequence[int]) -> Dataset:
        idx = np.asarray(idx, dtype=np.int64)
        return Dataset(np.ascontiguousarray(self.x[idx]), np.ascontiguousarray(self.y[idx]))


# ----------------------------------------------------------------------------------------------------------
# Images


def _bilinear_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # Half-pixel centres with the source index clamped at 0: the same convention as
    # torch.nn.functional.interpolate(mode="bilinear", align_corners=False), so models trained on data resized
    # here see what a torch pipeline would give them.
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    src = np.maximum(src, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = src - i0
    return i0, i1, frac


def resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinearly resize the last two axes of ``x`` to ``size`` (float32 out)."""
    h_out, w_out = size
    if h_out <= 0 or w_out <= 0:
        raise ValueError(f"resize target must be positive, got {size}")
    x = np.asarray(x, dtype=np.float64)
    if x.ndim < 2:
        raise ValueError(f"resize needs at least 2 dimensions, got shape {x.shape}")
    h_in, w_in = x.shape[-2:]
    r0, r1, rf = _bilinear_weights(h_in, h_out)
    c0, c1, cf = _bilinear_weights(w_in, w_out)
    rows = x[..., r0, :] * (1.0 - rf)[:, None] + x[..., r1, :] * rf[:, None]
    out = rows[..., c0] * (1.0 - cf) + rows[..., c1] * cf
    return out.astype(np.float32)


def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices: ``test_fraction`` of every class held out, seeded; both sorted."""
    rng = np.random.default_rng(seed)
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        n_test = int(round(test_fraction * len(members)))
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _digits_geometry(input_shape: tuple[int, ...]) -> tuple[int, int, int, bool]:
    """(channels, height, width, flatten) for a requested digits input shape."""
    if len(input_shape) == 3:
        c, h, w = input_shape
        if min(c, h, w) <= 0:
            raise ValueError(f"input_shape must be positive, got {input_shape}")
        return c, h, w, False
    if len(input_shape) == 1:
        (d,) = input_shape
        if d == 64:
            return 1, 8, 8, True
        for c in (1, 3):
            side = math.isqrt(d // c)
            if d % c == 0 and side * side * c == d:
                return c, side, side, True
        raise ValueError(f"flat digits need D = 64 or C*S*S with C in (1, 3), got D = {d}")
    raise ValueError(f"input_shape must be (C, H, W) or (D,), got {input_shape}")


def load_digits(
    input_shape: tuple[int, ...] = (1, 8, 8), *, test_fraction: float = 0.2, seed: int = 0
) -> tuple[Dataset, Dataset]:
    """scikit-learn's bundled 8x8 handwritten digits (1797 samples, 10 classes) as (train, test).

    Pixels are scaled to [0, 1], resized to H x W and replicated to C channels, then standardised with the
    mean/std of the train split only, so nothing about the test split leaks into training.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    c, h, w, flatten = _digits_geometry(tuple(input_shape))
    from sklearn.datasets import load_digits as _sk_load_digits  # lazy: devices never need scikit-learn

    bunch = _sk_load_digits()
    images = np.asarray(bunch.images, dtype=np.float64) / 16.0
    y = np.asarray(bunch.target, dtype=np.int64)
    if (h, w) != (8, 8):
        images = resize(images, (h, w)).astype(np.float64)
    x = np.repeat(images[:, None, :, :], c, axis=1)
    train_idx, test_idx = stratified_split(y, test_fraction, seed)
    mean = x[train_idx].mean()
    std = x[train_idx].std()
    x = ((x - mean) / std).astype(np.float32)
    if flatten:
        x = x.reshape(len(x), -1)
    full = Dataset(np.ascontiguousarray(x), y)
    return full.subset(train_idx), full.subset(test_idx)


def synthetic_images(
    n: int,
    input_shape: tuple[int, int, int] = (3, 32, 32),
    num_classes: int = 10,
    *,
    seed: int = 0,
    noise: float = 1.0,
    template_seed: int = 0,
) -> Dataset:
    """CIFAR-shaped class-conditional images: a fixed smooth template per class plus Gaussian noise.

    Templates depend only on ``template_seed`` (and the shape), samples on ``seed``, so a train and a test set
    drawn with different ``seed`` share their classes. Templates are drawn at 4 x 4 and upsampled, which gives
    spatially coherent patterns that convolutions (not just a linear probe) can pick up.
    """
    if n < 0 or num_classes < 1:
        raise ValueError(f"need n >= 0 and num_classes >= 1, got n={n}, num_classes={num_classes}")
    c, h, w = input_shape
    coarse = np.random.default_rng([template_seed, 0x5EED]).standard_normal((num_classes, c, 4, 4))
    templates = resize(coarse, (h, w)).astype(np.float64)
    templates /= templates.std(axis=(1, 2, 3), keepdims=True)
    rng = np.random.default_rng(seed)
    # Balanced labels in a shuffled order: every class is present whenever n >= num_classes.
    y = rng.permutation(np.arange(n, dtype=np.int64) % num_classes)
    x = templates[y] + noise * rng.standard_normal((n, c, h, w))
    return Dataset(x.astype(np.float32), y)


# ----------------------------------------------------------------------------------------------------------
# Partitioners: each returns sorted, disjoint int64 index arrays that together cover range(len(y)).


def partition_iid(y: np.ndarray, n_parts: int, *, seed: int = 0) -> list[np.ndarray]:
    """Uniformly random parts whose sizes differ by at most one."""
    if n_parts < 1:
        raise ValueError(f"n_parts must be >= 1, got {n_parts}")
    perm = np.random.default_rng(seed).permutation(len(y))
    return [np.sort(part).astype(np.int64) for part in np.array_split(perm, n_parts)]


def partition_dirichlet(
    y: np.ndarray, n_parts: int, alpha: float, *, seed: int = 0, min_size: int = 1, max_tries: int = 1000
) -> list[np.ndarray]:
    """Label skew: each class is spread over the parts in proportions drawn from Dirichlet(alpha).

    Small alpha gives each part few classes, large alpha approaches IID. Draws are repeated until every part
    holds at least ``min_size`` samples, since an empty device cannot train or be weighted.
    """
    y = np.asarray(y)
    if n_parts < 1 or alpha <= 0:
        raise ValueError(f"need n_parts >= 1 and alpha > 0, got n_parts={n_parts}, alpha={alpha}")
    if min_size * n_parts > len(y):
        raise ValueError(f"cannot give {n_parts} parts {min_size} samples each out of {len(y)}")
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_parts)]
        for label in classes:
            members = rng.permutation(np.flatnonzero(y == label))
            proportions = rng.dirichlet(np.full(n_parts, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(np.int64)
            for i, chunk in enumerate(np.split(members, cuts)):
                parts[i].append(chunk)
        out = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
        if min(len(p) for p in out) >= min_size:
            return out
    raise ValueError(f"no Dirichlet({alpha}) draw gave every part >= {min_size} samples in {max_tries} tries")


def partition_imbalanced(
    y: np.ndarray, n_parts: int, fraction: float, *, seed: int = 0, big: int = 0
) -> list[np.ndarray]:
    """Part ``big`` holds ``fraction`` of the samples, the others split the rest IID.

    These are the FedFly experiments' splits, where one device holds 25% or 50% of the data.
    """
    if n_parts < 1 or not 0 <= big < n_parts:
        raise ValueError(f"need n_parts >= 1 and 0 <= big < n_parts, got n_parts={n_parts}, big={big}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    if n_parts == 1:
        return [np.arange(len(y), dtype=np.int64)]
    perm = np.random.default_rng(seed).permutation(len(y))
    n_big = int(round(fraction * len(y)))
    rest = np.array_split(perm[n_big:], n_parts - 1)
    parts = [np.sort(p).astype(np.int64) for p in rest]
    parts.insert(big, np.sort(perm[:n_big]).astype(np.int64))
    return parts


def holdout(n: int, fraction: float, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held out): a seeded random ``fraction`` of ``range(n)`` held out (at least one row when
    ``fraction`` > 0 and n > 1), both sorted."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"a held-out fraction must be in [0, 1), got {fraction}")
    n_out = min(n - 1, max(1, round(fraction * n))) if fraction > 0 and n > 1 else 0
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_out:]).astype(np.int64), np.sort(perm[:n_out]).astype(np.int64)


def label_histogram(y: np.ndarray, num_classes: int | None = None) -> np.ndarray:
    """Count of each label 0..num_classes-1 (int64); by default up to the largest label present."""
    y = np.asarray(y)
    if num_classes is None:
        num_classes = int(y.max()) + 1 if y.size else 0
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got range [{y.min()}, {y.max()}]")
    return np.bincount(y.astype(np.int64), minlength=num_classes).astype(np.int64)


# ----------------------------------------------------------------------------------------------------------
# Batch order


class BatchOrder:
    """Deterministic mini-batch order that can resume at any (epoch, batch) without replaying earlier ones.

    Each epoch's permutation comes from ``default_rng([seed, epoch])`` alone, so a migration checkpoint only
    needs (epoch, batch index) as its data position (FedFly; docs/design.md, "Migration").
    """

    def __init__(
        self, n: int, batch_size: int, *, seed: int, shuffle: bool = True, drop_last: bool = False
    ) -> None:
        if n < 1 or batch_size < 1:
            raise ValueError(f"need n >= 1 and batch_size >= 1, got n={n}, batch_size={batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0 (numpy SeedSequence), got {seed}")
        if drop_last and n < batch_size:
            raise ValueError(f"drop_last with n={n} < batch_size={batch_size} leaves no batches")
        self.n = n
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last

    def batches_per_epoch(self) -> int:
        if self.drop_last:
            return self.n // self.batch_size
        return -(-self.n // self.batch_size)

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        else:
            order = np.arange(self.n)
        order = order.astype(np.int64)
        return [
            order[i * self.batch_size : (i + 1) * self.batch_size] for i in range(self.batches_per_epoch())
        ]

    def batch(self, epoch: int, index: int) -> np.ndarray:
        """The ``index``-th batch of ``epoch``."""
        if not 0 <= index < self.batches_per_epoch():
            raise IndexError(f"batch index {index} outside [0, {self.batches_per_epoch()})")
        return self.epoch_batches(epoch)[index]

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, batch index) of the ``step``-th batch counted from the start of training."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return divmod(step, self.batches_per_epoch())
