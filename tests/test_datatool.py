"""``mqttfl data`` (docs/data.md): CSV/TSV, arrays and image folders become device shards and a test set, by
every partition; the built-in PNG and PGM/PPM readers decode what encoders write; bad input is refused by name."""

from __future__ import annotations

import csv
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from mqttfl.ml.shard import open_shard
from mqttfl.tools.images import ImageError, read_image

ROOT = Path(__file__).resolve().parent.parent


def data_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mqttfl.tools.cli", "data", *map(str, args)], capture_output=True,
                          text=True, timeout=120, check=False)


def write_csv(path: Path, rows: int = 300, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 4))
    y = (x @ rng.normal(size=(4, 3))).argmax(1)
    names = np.array(["bird", "cat", "dog"])[y]
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t" if path.suffix == ".tsv" else ",")
        w.writerow(["f1", "f2", "f3", "f4", "sensor", "animal"])
        for i in range(rows):
            w.writerow([*(f"{v:.5f}" for v in x[i]), f"Pi-{i % 3}", names[i]])
    return y


def test_a_csv_becomes_shards_a_test_set_and_the_keys_to_use(tmp_path: Path) -> None:
    y = write_csv(tmp_path / "animals.csv")
    r = data_cli("split", tmp_path / "animals.csv", "--out", tmp_path / "out", "--drop", "sensor", "--devices",
                 "dev1,dev2,dev3", "--partition", "dirichlet:0.5", "--eval-fraction", "0.2", "--standardize")
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert meta["classes"] == ["bird", "cat", "dog"] and meta["features"] == ["f1", "f2", "f3", "f4"]
    assert meta["cloud"] == {"input_shape": [4], "num_classes": 3, "loss": "cross_entropy",
                             "test_data": str((tmp_path / "out" / "test.npz").resolve())}
    assert 'num_classes = 3' in r.stdout and 'loss = "cross_entropy"' in r.stdout
    test = open_shard(tmp_path / "out" / "test.npz")
    shards = [open_shard(tmp_path / "out" / f"dev{i}.npz") for i in (1, 2, 3)]
    held = [open_shard(tmp_path / "out" / f"dev{i}.eval.npz") for i in (1, 2, 3)]
    # Stratified test split (a fifth of every class); every label one of the three classes, in sorted order.
    assert np.bincount(test.labels(), minlength=3).tolist() == [round(0.2 * c) for c in np.bincount(y)]
    assert len(test) + sum(map(len, shards)) + sum(map(len, held)) == 300
    # Standardised with the training part's statistics only.
    train_x = np.concatenate([s.batch(np.arange(len(s)))[0] for s in shards + held])
    assert np.allclose(train_x.mean(axis=0), 0, atol=1e-5) and np.allclose(train_x.std(axis=0), 1, atol=1e-4)
    assert len(meta["standardize"]["mean"]) == 4
    d = data_cli("describe", tmp_path / "out", "--json")
    assert d.returncode == 0, d.stderr
    described = {Path(i["path"]).name: i for i in json.loads(d.stdout)}
    assert described["test.npz"]["memory_mapped"] and described["test.npz"]["counts"] == \
        np.bincount(test.labels(), minlength=3).tolist()


def test_a_tsv_split_by_a_column_gives_one_shard_per_value_named_after_it(tmp_path: Path) -> None:
    write_csv(tmp_path / "animals.tsv", rows=90)
    r = data_cli("split", tmp_path / "animals.tsv", "--out", tmp_path / "out", "--label", "animal",
                 "--partition", "column:sensor", "--test-fraction", "0")
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert sorted(meta["shards"]) == ["pi-0", "pi-1", "pi-2"]
    assert all(s["samples"] == 30 for s in meta["shards"].values()) and "test_data" not in meta["cloud"]
    assert open_shard(tmp_path / "out" / "pi-0.npz").input_shape == (4,), "the partition column is no feature"


def test_regression_and_multi_label_columns_become_float_targets(tmp_path: Path) -> None:
    path = tmp_path / "sensors.csv"
    rng = np.random.default_rng(1)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["a", "b", "temp", "hot", "wet"])
        for _ in range(50):
            a, b = rng.normal(size=2)
            w.writerow([a, b, 20 + 3 * a, int(a > 0), int(b > 0)])
    r = data_cli("split", path, "--out", tmp_path / "reg", "--label", "temp", "--drop", "hot,wet", "--parts", "2")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "reg" / "dataset.json").read_text())["cloud"]["loss"] == "mse"
    reg = open_shard(tmp_path / "reg" / "dev1.npz")
    assert reg.label_format.kind == "target" and reg.label_format.width == 1
    r = data_cli("split", path, "--out", tmp_path / "ml", "--label", "hot,wet", "--drop", "temp", "--parts", "2")
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "ml" / "dataset.json").read_text())
    assert meta["task"] == "multilabel" and meta["cloud"]["num_classes"] == 2
    assert meta["cloud"]["loss"] == "bce_with_logits"


def test_arrays_in_an_npz_or_npy_pair_of_any_safe_dtype_split_imbalanced(tmp_path: Path) -> None:
    x = np.random.default_rng(0).integers(0, 255, size=(200, 1, 4, 4)).astype(np.uint8)
    y = (np.arange(200) % 5).astype(np.int16)
    np.savez(tmp_path / "raw.npz", images=x, targets=y)
    r = data_cli("split", tmp_path / "raw.npz", "--x-key", "images", "--y-key", "targets", "--out", tmp_path / "a",
                 "--parts", "4", "--partition", "imbalanced:0.5", "--test-fraction", "0.1")
    assert r.returncode == 0, r.stderr
    sizes = [len(open_shard(tmp_path / "a" / f"dev{i}.npz")) for i in range(1, 5)]
    assert sizes[0] == 90 and sum(sizes) == 180
    np.save(tmp_path / "x.npy", x.astype(np.float64))
    np.save(tmp_path / "y.npy", y)
    r = data_cli("split", tmp_path / "x.npy", "--labels", tmp_path / "y.npy", "--out", tmp_path / "b", "--parts", "2")
    assert r.returncode == 0, r.stderr
    assert open_shard(tmp_path / "b" / "dev1.npz").batch(np.arange(2))[0].dtype == np.float32


@pytest.mark.parametrize(("args", "match"), [
    (["--label", "nope", "--parts", "2"], "no column 'nope'"),
    (["--label", "animal", "--parts", "2"], "'Pi-0' is not a number"),
    (["--label", "animal", "--drop", "sensor", "--parts", "2", "--task", "regression"], "row 2, label 'animal'"),
    (["--drop", "sensor"], "--devices dev1,dev2"),
    (["--drop", "sensor", "--devices", "Dev_1,dev2"], "device id 'Dev_1'"),
    (["--drop", "sensor", "--parts", "2", "--partition", "column:sensor"], "3 values"),
])
def test_bad_input_is_refused_naming_the_problem(tmp_path: Path, args: list[str], match: str) -> None:
    write_csv(tmp_path / "animals.csv", rows=30)
    r = data_cli("split", tmp_path / "animals.csv", "--out", tmp_path / "out", *args)
    assert r.returncode == 2 and match in r.stderr, r.stderr


# ------------------------------------------------------------------------------------------------ images


def _png(img: np.ndarray, color: int, filters: list[int], depth: int = 8, palette: np.ndarray | None = None) -> bytes:
    """A PNG written the way encoders do, with a chosen filter per row (to check the reader undoes each)."""
    h, w = img.shape[:2]
    data = img.astype(">u2" if depth == 16 else np.uint8).reshape(h, -1).view(np.uint8).reshape(h, -1)
    bpp = max(1, data.shape[1] // w)
    raw = bytearray()
    prev = np.zeros(data.shape[1], np.int32)
    for y in range(h):
        cur = data[y].astype(np.int32)
        left = np.concatenate([np.zeros(bpp, np.int32), cur[:-bpp]])
        upleft = np.concatenate([np.zeros(bpp, np.int32), prev[:-bpp]])
        f = filters[y % len(filters)]
        if f == 0:
            line = cur
        elif f == 1:
            line = cur - left
        elif f == 2:
            line = cur - prev
        elif f == 3:
            line = cur - (left + prev) // 2
        else:
            p = left + prev - upleft
            pa, pb, pc = abs(p - left), abs(p - prev), abs(p - upleft)
            line = cur - np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prev, upleft))
        raw += bytes([f]) + (line % 256).astype(np.uint8).tobytes()
        prev = cur

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, 0))
    if palette is not None:
        out += chunk(b"PLTE", palette.astype(np.uint8).tobytes())
    return out + chunk(b"IDAT", zlib.compress(bytes(raw))) + chunk(b"IEND", b"")


@pytest.mark.parametrize("filters", [[0], [1], [2], [3], [4], [0, 1, 2, 3, 4]])
def test_the_png_reader_undoes_every_filter(tmp_path: Path, filters: list[int]) -> None:
    img = np.random.default_rng(0).integers(0, 256, size=(7, 9, 3))
    (tmp_path / "a.png").write_bytes(_png(img, 2, filters))
    np.testing.assert_allclose(read_image(tmp_path / "a.png"), img / 255.0, atol=1e-6)


def test_gray_alpha_sixteen_bit_palette_and_netpbm_images_are_read(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    gray16 = rng.integers(0, 65536, size=(5, 6, 1))
    (tmp_path / "g.png").write_bytes(_png(gray16, 0, [4], depth=16))
    np.testing.assert_allclose(read_image(tmp_path / "g.png"), gray16 / 65535.0, atol=1e-6)
    rgba = rng.integers(0, 256, size=(4, 4, 4))
    (tmp_path / "c.png").write_bytes(_png(rgba, 6, [1, 3]))
    np.testing.assert_allclose(read_image(tmp_path / "c.png"), rgba[:, :, :3] / 255.0, atol=1e-6)
    pal = rng.integers(0, 256, size=(4, 3))
    idx = rng.integers(0, 4, size=(3, 5, 1))
    (tmp_path / "p.png").write_bytes(_png(idx, 3, [0], palette=pal))
    np.testing.assert_allclose(read_image(tmp_path / "p.png"), pal[idx[:, :, 0]] / 255.0, atol=1e-6)
    ppm = rng.integers(0, 256, size=(3, 2, 3)).astype(np.uint8)
    (tmp_path / "x.ppm").write_bytes(b"P6\n# made by hand\n2 3\n255\n" + ppm.tobytes())
    np.testing.assert_allclose(read_image(tmp_path / "x.ppm"), ppm / 255.0, atol=1e-6)
    (tmp_path / "x.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    with pytest.raises(ImageError, match="x.jpg"):
        read_image(tmp_path / "x.jpg")


def test_an_image_folder_becomes_classified_shards(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    for c, name in enumerate(["circle", "square"]):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(10):
            img = np.clip(rng.normal(100 + 60 * c, 20, size=(12, 10, 3)), 0, 255)
            (tmp_path / "imgs" / name / f"{i}.png").write_bytes(_png(img, 2, [i % 5]))
    (tmp_path / "imgs" / "circle" / "gray.pgm").write_bytes(b"P5 10 12 255\n" + bytes(range(120)))
    r = data_cli("split", tmp_path / "imgs", "--out", tmp_path / "out", "--parts", "2", "--size", "8,8",
                 "--test-fraction", "0.25")
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert meta["classes"] == ["circle", "square"] and meta["cloud"]["input_shape"] == [3, 8, 8]
    shard = open_shard(tmp_path / "out" / "dev1.npz")
    x, _ = shard.batch(np.arange(len(shard)))
    assert x.shape[1:] == (3, 8, 8) and 0 <= x.min() and x.max() <= 1
