"""Data sets, partitioners, shards, batch order and the CIFAR-10 readers (docs/design.md, "Data")."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mqttfl.ml.cifar import CIFAR10_MEAN, CIFAR10_STD, load_cifar10
from mqttfl.ml.data import (
    BatchOrder,
    Dataset,
    label_histogram,
    load_digits,
    partition_dirichlet,
    partition_iid,
    partition_imbalanced,
    resize,
    synthetic_images,
)

# ---------------------------------------------------------------------------------------------------------
# Digits


@pytest.fixture(scope="module")
def digits_8() -> tuple[Dataset, Dataset]:
    return load_digits((1, 8, 8))


def test_importing_data_pulls_in_neither_sklearn_nor_torch() -> None:
    code = "import sys, mqttfl.ml.data; print('sklearn' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_digits_8x8_has_all_samples_in_nchw_float32(digits_8: tuple[Dataset, Dataset]) -> None:
    train, test = digits_8
    assert len(train) + len(test) == 1797
    assert train.x.shape[1:] == (1, 8, 8) and train.x.dtype == np.float32 and train.y.dtype == np.int64
    assert abs(len(test) - 0.2 * 1797) <= 10


def test_digits_train_split_is_standardised(digits_8: tuple[Dataset, Dataset]) -> None:
    train, test = digits_8
    assert abs(float(train.x.mean())) < 1e-4
    assert abs(float(train.x.std()) - 1.0) < 1e-4
    # The test split uses the train statistics, so it is only close to standard.
    assert abs(float(test.x.mean())) < 0.1


def test_digits_resized_to_cifar_shape_replicates_channels() -> None:
    train, test = load_digits((3, 32, 32))
    assert train.x.shape[1:] == (3, 32, 32) and test.x.shape[1:] == (3, 32, 32)
    np.testing.assert_array_equal(train.x[:, 0], train.x[:, 2])
    assert abs(float(train.x.mean())) < 1e-4


def test_flat_digits_are_the_flattened_images(digits_8: tuple[Dataset, Dataset]) -> None:
    train_flat, _ = load_digits((64,))
    assert train_flat.x.shape[1:] == (64,)
    np.testing.assert_allclose(train_flat.x, digits_8[0].x.reshape(len(train_flat), 64), atol=1e-6)
    big, _ = load_digits((3 * 16 * 16,))
    assert big.x.shape[1:] == (768,)
    with pytest.raises(ValueError, match="D = 65"):
        load_digits((65,))


def test_digits_split_is_stratified_and_determined_by_seed(digits_8: tuple[Dataset, Dataset]) -> None:
    again_train, again_test = load_digits((1, 8, 8), seed=0)
    np.testing.assert_array_equal(again_test.x, digits_8[1].x)
    np.testing.assert_array_equal(again_test.y, digits_8[1].y)
    other_test = load_digits((1, 8, 8), seed=1)[1]
    assert not np.array_equal(other_test.y, digits_8[1].y) or not np.array_equal(other_test.x, digits_8[1].x)
    share = label_histogram(digits_8[1].y, 10) / (
        label_histogram(digits_8[0].y, 10) + label_histogram(digits_8[1].y, 10)
    )
    assert np.all(np.abs(share - 0.2) < 0.02)


@pytest.mark.parametrize("size", [(32, 32), (5, 13), (3, 2), (8, 8)])
def test_resize_matches_torch_bilinear(size: tuple[int, int]) -> None:
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 7)).astype(np.float32)
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(x), size=size, mode="bilinear", align_corners=False
    ).numpy()
    np.testing.assert_allclose(resize(x, size), expected, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Synthetic images


def test_synthetic_images_are_learnable_by_nearest_class_mean() -> None:
    train = synthetic_images(500, seed=1)
    test = synthetic_images(300, seed=2)
    means = np.stack([train.x[train.y == k].mean(axis=0) for k in range(10)]).reshape(10, -1)
    flat = test.x.reshape(len(test), -1)
    dist = ((flat[:, None, :] - means[None, :, :]) ** 2).sum(axis=-1)
    accuracy = float((dist.argmin(axis=1) == test.y).mean())
    assert accuracy > 0.9


def test_synthetic_images_are_deterministic_and_balanced() -> None:
    a = synthetic_images(50, (1, 8, 8), 5, seed=3)
    b = synthetic_images(50, (1, 8, 8), 5, seed=3)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
    assert a.x.shape == (50, 1, 8, 8) and a.x.dtype == np.float32
    np.testing.assert_array_equal(label_histogram(a.y, 5), [10] * 5)
    assert not np.array_equal(synthetic_images(50, (1, 8, 8), 5, seed=4).x, a.x)


# ---------------------------------------------------------------------------------------------------------
# Partitioners

LABELS = np.random.default_rng(7).integers(0, 10, size=2000)


def assert_disjoint_cover(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert joined.dtype == np.int64
    assert len(joined) == n
    np.testing.assert_array_equal(np.sort(joined), np.arange(n))


def test_iid_parts_cover_disjointly_with_sizes_within_one() -> None:
    parts = partition_iid(LABELS, 7, seed=1)
    assert_disjoint_cover(parts, len(LABELS))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert all(np.array_equal(a, b) for a, b in zip(parts, partition_iid(LABELS, 7, seed=1), strict=True))


def _mean_top_class_share(parts: list[np.ndarray]) -> float:
    hists = [label_histogram(LABELS[p], 10) for p in parts]
    return float(np.mean([h.max() / h.sum() for h in hists]))


def test_dirichlet_large_alpha_is_nearly_balanced() -> None:
    parts = partition_dirichlet(LABELS, 5, alpha=1000.0, seed=0)
    assert_disjoint_cover(parts, len(LABELS))
    sizes = np.array([len(p) for p in parts])
    assert np.all(np.abs(sizes - 400) < 40)
    assert _mean_top_class_share(parts) < 0.15


def test_dirichlet_small_alpha_skews_labels_and_respects_min_size() -> None:
    parts = partition_dirichlet(LABELS, 5, alpha=0.05, seed=0, min_size=20)
    assert_disjoint_cover(parts, len(LABELS))
    assert min(len(p) for p in parts) >= 20
    assert _mean_top_class_share(parts) > 0.4


@pytest.mark.parametrize(("fraction", "big"), [(0.25, 0), (0.5, 2), (0.5, 4)])
def test_imbalanced_gives_the_big_part_its_fraction(fraction: float, big: int) -> None:
    y = LABELS[:1999]
    parts = partition_imbalanced(y, 5, fraction, seed=3, big=big)
    assert_disjoint_cover(parts, len(y))
    assert abs(len(parts[big]) - fraction * len(y)) <= 1
    rest = [len(p) for i, p in enumerate(parts) if i != big]
    assert max(rest) - min(rest) <= 1


def test_label_histogram_counts_every_class_and_rejects_out_of_range() -> None:
    np.testing.assert_array_equal(label_histogram(np.array([0, 2, 2]), 4), [1, 0, 2, 0])
    with pytest.raises(ValueError):
        label_histogram(np.array([0, 4]), 4)


# ---------------------------------------------------------------------------------------------------------
# Batch order


def test_every_epoch_visits_every_index_once() -> None:
    order = BatchOrder(103, 10, seed=5)
    assert order.batches_per_epoch() == 11
    for epoch in range(3):
        batches = order.epoch_batches(epoch)
        assert [len(b) for b in batches] == [10] * 10 + [3]
        np.testing.assert_array_equal(np.sort(np.concatenate(batches)), np.arange(103))
    assert not np.array_equal(order.epoch_batches(0)[0], order.epoch_batches(1)[0])


def test_drop_last_and_no_shuffle() -> None:
    order = BatchOrder(103, 10, seed=0, shuffle=False, drop_last=True)
    batches = order.epoch_batches(4)
    assert order.batches_per_epoch() == 10 and len(batches) == 10
    np.testing.assert_array_equal(np.concatenate(batches), np.arange(100))


def test_resuming_from_a_step_continues_the_same_sequence() -> None:
    seq = [b for epoch in range(3) for b in BatchOrder(57, 8, seed=11).epoch_batches(epoch)]
    for step in (0, 5, 8, 13, 20):
        # A fresh object, as on the destination edge after a migration: only (seed, step) travel.
        resumed = BatchOrder(57, 8, seed=11)
        epoch, index = resumed.locate(step)
        tail = resumed.epoch_batches(epoch)[index:] + resumed.epoch_batches(epoch + 1)
        for expected, got in zip(seq[step:], tail, strict=False):
            np.testing.assert_array_equal(expected, got)
        np.testing.assert_array_equal(resumed.batch(epoch, index), seq[step])


def test_batch_order_depends_on_seed() -> None:
    assert not np.array_equal(
        BatchOrder(50, 50, seed=1).epoch_batches(0)[0], BatchOrder(50, 50, seed=2).epoch_batches(0)[0]
    )


# ---------------------------------------------------------------------------------------------------------
# CIFAR-10


def _fake_images(n: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(offset)
    images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    labels = (np.arange(n) + offset) % 10
    return images, labels


def _write_bin(directory: Path, name: str, images: np.ndarray, labels: np.ndarray) -> None:
    records = np.concatenate([labels.astype(np.uint8)[:, None], images.reshape(len(images), -1)], axis=1)
    (directory / name).write_bytes(records.tobytes())


def _write_py(directory: Path, name: str, images: np.ndarray, labels: np.ndarray, protocol: int = 2) -> None:
    batch = {
        b"batch_label": b"fake",
        b"labels": [int(v) for v in labels],
        b"data": images.reshape(len(images), -1),
    }
    (directory / name).write_bytes(pickle.dumps(batch, protocol=protocol))


@pytest.fixture
def cifar_parts() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {
        "data_batch_1": _fake_images(10, 0),
        "data_batch_2": _fake_images(10, 3),
        "test_batch": _fake_images(4, 7),
    }


def _check(train: Dataset, test: Dataset, parts: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    images = np.concatenate([parts["data_batch_1"][0], parts["data_batch_2"][0]])
    labels = np.concatenate([parts["data_batch_1"][1], parts["data_batch_2"][1]])
    assert train.x.shape == (20, 3, 32, 32) and test.x.shape == (4, 3, 32, 32)
    np.testing.assert_array_equal(train.y, labels)
    np.testing.assert_array_equal(test.y, parts["test_batch"][1])
    np.testing.assert_allclose(train.x, images / 255.0, atol=1e-6)


def test_cifar_binary_batches_parse_into_nchw_with_labels(tmp_path: Path, cifar_parts) -> None:
    directory = tmp_path / "cifar-10-batches-bin"
    directory.mkdir()
    for name, (images, labels) in cifar_parts.items():
        _write_bin(directory, name + ".bin", images, labels)
    _check(*load_cifar10(tmp_path, normalize=False), cifar_parts)
    _check(*load_cifar10(directory, normalize=False), cifar_parts)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_python_batches_parse_into_nchw_with_labels(tmp_path: Path, cifar_parts, protocol: int) -> None:
    directory = tmp_path / "cifar-10-batches-py"
    directory.mkdir()
    for name, (images, labels) in cifar_parts.items():
        _write_py(directory, name, images, labels, protocol)
    _check(*load_cifar10(tmp_path, normalize=False), cifar_parts)
    _check(*load_cifar10(directory, normalize=False), cifar_parts)


def test_cifar_is_normalised_per_channel_by_default(tmp_path: Path, cifar_parts) -> None:
    for name, (images, labels) in cifar_parts.items():
        _write_bin(tmp_path, name + ".bin", images, labels)
    train, _ = load_cifar10(tmp_path)
    raw = np.concatenate([cifar_parts["data_batch_1"][0], cifar_parts["data_batch_2"][0]]) / 255.0
    mean = np.array(CIFAR10_MEAN).reshape(1, 3, 1, 1)
    std = np.array(CIFAR10_STD).reshape(1, 3, 1, 1)
    np.testing.assert_allclose(train.x, (raw - mean) / std, atol=1e-5)
    assert train.x.dtype == np.float32


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - the point of the test
        return (os.system, (f"touch {self.marker}",))


def test_cifar_python_batch_that_calls_a_function_is_refused(tmp_path: Path, cifar_parts) -> None:
    directory = tmp_path / "cifar-10-batches-py"
    directory.mkdir()
    for name, (images, labels) in cifar_parts.items():
        _write_py(directory, name, images, labels)
    marker = tmp_path / "pwned"
    (directory / "test_batch").write_bytes(pickle.dumps({b"data": _Evil(marker)}, protocol=2))
    with pytest.raises(ValueError, match="refusing to load"):
        load_cifar10(tmp_path)
    assert not marker.exists()


def test_cifar_truncated_binary_batch_is_refused(tmp_path: Path, cifar_parts) -> None:
    for name, (images, labels) in cifar_parts.items():
        _write_bin(tmp_path, name + ".bin", images, labels)
    (tmp_path / "test_batch.bin").write_bytes((tmp_path / "test_batch.bin").read_bytes()[:-1])
    with pytest.raises(ValueError, match="records"):
        load_cifar10(tmp_path)


def test_cifar_missing_directory_says_what_it_expected(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-bin"):
        load_cifar10(tmp_path)
