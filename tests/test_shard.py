"""Shards on disk (docs/data.md): memory-mapped, any dtype that converts safely, labels of every task, and a
clear refusal of anything else."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mqttfl.ml.data import Dataset, synthetic_images
from mqttfl.ml.shard import label_counts, load_shard, open_shard, save_shard
from mqttfl.protocol.plan import LabelFormat, Training


def test_a_shard_round_trips_exactly_and_is_memory_mapped(tmp_path: Path) -> None:
    ds = synthetic_images(12, (3, 4, 4), seed=0)
    path = tmp_path / "shard.bin"
    save_shard(path, ds)
    shard = open_shard(path)
    assert shard.memory_mapped and isinstance(shard.x, np.memmap)
    assert len(shard) == 12 and shard.input_shape == (3, 4, 4)
    x, y = shard.batch(np.array([5, 0, 7]))
    np.testing.assert_array_equal(x, ds.x[[5, 0, 7]])
    np.testing.assert_array_equal(y, ds.y[[5, 0, 7]])
    back = load_shard(path)
    np.testing.assert_array_equal(back.x, ds.x)
    np.testing.assert_array_equal(back.y, ds.y)
    assert shard.label_format == LabelFormat("class", 10)


def test_reading_a_batch_does_not_load_the_shard(tmp_path: Path) -> None:
    """A 400 MB shard opened and sampled in a fresh process: its memory grows by a batch, not the shard."""
    path = tmp_path / "big.npz"
    with open(path, "wb") as f:
        np.savez(f, x=np.zeros((100_000, 1000), np.float32), y=np.zeros(100_000, np.int64))
    code = ("import resource, numpy as np; from mqttfl.ml.shard import open_shard\n"
            "def rss(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
            "s = open_shard(__import__('sys').argv[1]); before = rss()\n"
            "x, y = s.batch(np.arange(0, 100_000, 1000)); print(rss() - before, x.shape)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    grew_mb = float(out.stdout.split()[0])
    # Opening checks finiteness in 8 MB chunks; the pages it touched are clean file pages, counted in RSS only
    # while resident. Well under the shard's 400 MB either way.
    assert grew_mb < 150, out.stdout


@pytest.mark.parametrize(("xdtype", "ydtype"), [(np.float64, np.int32), (np.uint8, np.uint8), (np.float16, np.int16),
                                                (np.int32, np.int64), (np.bool_, np.uint16)])
def test_any_dtype_that_converts_safely_is_accepted(tmp_path: Path, xdtype: type, ydtype: type) -> None:
    path = tmp_path / "s.npz"
    np.savez(path, x=np.ones((6, 4), xdtype), y=np.arange(6).astype(ydtype) % 3, note=np.zeros(2))
    x, y = open_shard(path).batch(np.arange(6))
    assert x.dtype == np.float32 and y.dtype == np.int64 and y.tolist() == [0, 1, 2, 0, 1, 2]


def test_float_labels_are_targets_and_2d_zero_one_labels_count_positives(tmp_path: Path) -> None:
    path = tmp_path / "reg.npz"
    np.savez(path, x=np.ones((5, 2)), y=np.linspace(0, 1, 5))
    reg = open_shard(path)
    assert reg.label_format == LabelFormat("target", 1) and reg.batch(np.arange(2))[1].shape == (2, 1)
    assert label_counts(reg.labels()) is None
    np.savez(path, x=np.ones((3, 2)), y=np.array([[1, 0, 1], [0, 0, 1], [1, 0, 1]], np.uint8))
    multi = open_shard(path)
    assert multi.label_format == LabelFormat("target", 3) and label_counts(multi.labels()) == [2, 0, 3]


def test_a_compressed_shard_is_read_whole(tmp_path: Path) -> None:
    path = tmp_path / "c.npz"
    np.savez_compressed(path, x=np.ones((4, 2), np.float32), y=np.zeros(4, np.int64))
    shard = open_shard(path)
    assert not shard.memory_mapped and shard.batch(np.arange(4))[0].shape == (4, 2)


@pytest.mark.parametrize(("arrays", "match"), [
    ({"x": np.array([{"a": 1}], dtype=object), "y": np.zeros(1, np.int64)}, "not a valid mqttfl shard"),
    ({"x": np.zeros((2, 3), np.complex64), "y": np.zeros(2, np.int64)}, "dtype complex64"),
    ({"x": np.array([["a", "b"]]), "y": np.zeros(1, np.int64)}, "numbers"),
    ({"x": np.zeros((2, 3), np.float32), "y": np.zeros(3, np.int64)}, "one row per sample"),
    ({"x": np.zeros((2, 3), np.float32)}, "lacks"),
    ({"x": np.zeros(3, np.float32), "y": np.zeros(3, np.int64)}, "ndim"),
    ({"x": np.zeros((2, 3), np.float32), "y": np.array([0, -1])}, "negative labels"),
    ({"x": np.array([[0.0, np.nan]]), "y": np.zeros(1, np.int64)}, "NaN"),
])
def test_a_bad_shard_is_refused_naming_the_problem(tmp_path: Path, arrays: dict[str, np.ndarray], match: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=match):
        open_shard(path)


def test_a_file_that_is_not_an_npz_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "junk.npz"
    path.write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(ValueError, match="not a valid mqttfl shard"):
        open_shard(path)


def test_labels_say_which_plans_they_can_train() -> None:
    classes = LabelFormat("class", 12)
    assert classes.problem(Training(num_classes=12)) is None
    assert "num_classes = 10" in str(classes.problem(Training(num_classes=10)))
    assert "float targets" in str(classes.problem(Training(loss="mse", num_classes=1)))
    targets = LabelFormat("target", 3)
    assert targets.problem(Training(loss="bce_with_logits", num_classes=3)) is None
    assert "integer class labels" in str(targets.problem(Training()))
    assert "3 float targets" in str(targets.problem(Training(loss="mse", num_classes=2)))


def test_an_in_memory_dataset_takes_float_targets_too() -> None:
    ds = Dataset(np.zeros((3, 2), np.float32), np.zeros((3, 4), np.float32))
    assert ds.subset([0, 2]).y.shape == (2, 4)
    with pytest.raises(ValueError, match="float32"):
        Dataset(np.zeros((3, 2), np.float32), np.zeros(3, np.float32))
