"""Tests of models/data.py: bundled data, the MNIST search order, IDX parsing and fetch() against a local server.

No test touches the network or the user's home: HOME, Path.home(), the working directory, $DLCOMPARE_DATA_DIR and the
Debian Fashion-MNIST folder are all redirected into tmp_path.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import shutil
import socket
import threading
from pathlib import Path

import numpy as np
import pytest

from models import data
from models.data import DataError, Dataset, fetch, load_dataset, read_idx, sha256_file

IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Keep every test away from the real ~/.keras, ./data, $DLCOMPARE_DATA_DIR and /usr/share/datasets."""
    home = tmp_path / "home"
    home.mkdir()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: home))
    monkeypatch.chdir(cwd)
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.setattr(data, "FASHION_SYSTEM_DIR", tmp_path / "no-system-fashion")
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    return home


# ---------------------------------------------------------------------------------------------------- helpers
def idx_bytes(arr: np.ndarray) -> bytes:
    arr = np.asarray(arr, dtype=np.uint8)
    magic = {1: 0x801, 3: 0x803}[arr.ndim]
    header = magic.to_bytes(4, "big") + b"".join(int(n).to_bytes(4, "big") for n in arr.shape)
    return header + arr.tobytes()


def write_idx(path: Path, arr: np.ndarray) -> Path:
    raw = idx_bytes(arr)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


def synthetic_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), (np.arange(n) % 10).astype(np.uint8)


def write_idx_set(d: Path, n_train=30, n_test=20, gz=True, seed=1) -> dict[str, np.ndarray]:
    xtr, ytr = synthetic_digits(n_train, seed)
    xte, yte = synthetic_digits(n_test, seed + 1)
    arrays = dict(zip(IDX_STEMS, (xtr, ytr, xte, yte)))
    for stem, arr in arrays.items():
        write_idx(d / (stem + (".gz" if gz else "")), arr)
    return arrays


def write_npz(path: Path, n_train=12, n_test=8, seed=5) -> dict[str, np.ndarray]:
    xtr, ytr = synthetic_digits(n_train, seed)
    xte, yte = synthetic_digits(n_test, seed + 1)
    arrays = {"x_train": xtr, "y_train": ytr, "x_test": xte, "y_test": yte}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return arrays


def check_images(ds: Dataset, arrays_x_train: np.ndarray, arrays_y_train: np.ndarray) -> None:
    assert ds.x_train.dtype == np.float64 and ds.x_train.shape == (len(arrays_x_train), 28, 28, 1)
    assert ds.y_train.dtype == np.int64 and ds.y_train.shape == (len(arrays_x_train),)
    np.testing.assert_array_equal(ds.x_train[..., 0], arrays_x_train / 255.0)
    np.testing.assert_array_equal(ds.y_train, arrays_y_train)


# --------------------------------------------------------------------------------------------- toy and pima
def test_toy_431():
    ds = load_dataset("toy_431")
    np.testing.assert_array_equal(ds.x_train, [[1, 0, 1, 0], [1, 0, 1, 1], [0, 1, 0, 1]])
    np.testing.assert_array_equal(ds.y_train, [[1], [1], [0]])
    assert ds.x_train.dtype == ds.y_train.dtype == np.float64
    assert ds.x_train.shape == (3, 4) and ds.y_train.shape == (3, 1)
    assert ds.x_test is None and ds.y_test is None


def test_unknown_name_lists_valid_names():
    with pytest.raises(DataError, match="toy_431, or_gate, pima, mnist, fashion_mnist"):
        load_dataset("cifar10")


def test_pima_bundled():
    ds = load_dataset("pima")
    assert ds.x_train.shape == (768, 8) and ds.y_train.shape == (768, 1)
    assert ds.x_train.dtype == ds.y_train.dtype == np.float64
    np.testing.assert_array_equal(ds.x_train[0], [6, 148, 72, 35, 0, 33.6, 0.627, 50])
    assert ds.y_train[0, 0] == 1
    assert (ds.y_train == 0).sum() == 500 and (ds.y_train == 1).sum() == 268
    assert ds.x_train.max() > 100  # unscaled
    assert ds.x_test is None and ds.y_test is None
    assert "pima-indians-diabetes.csv" in ds.source and "models/bundled-data" in ds.source


def test_pima_checksum_mismatch(tmp_path, monkeypatch):
    bad = tmp_path / "pima-indians-diabetes.csv"
    shutil.copy(data.PIMA_CSV, bad)
    bad.write_text(bad.read_text().replace("6,148,72", "7,148,72", 1))
    monkeypatch.setattr(data, "PIMA_CSV", bad)
    with pytest.raises(DataError) as e:
        load_dataset("pima")
    assert data.PIMA_SHA256 in str(e.value) and sha256_file(bad) in str(e.value) and str(bad) in str(e.value)


def test_pima_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "PIMA_CSV", tmp_path / "gone.csv")
    with pytest.raises(DataError, match="gone.csv"):
        load_dataset("pima")


def test_pima_user_file_in_data_dir(tmp_path):
    (tmp_path / "pima-indians-diabetes.csv").write_text("1,2,3,4,5,6,7,8,0\n2,3,4,5,6,7,8,9,1\n")
    ds = load_dataset("pima", data_dir=tmp_path)
    np.testing.assert_array_equal(ds.x_train, [[1, 2, 3, 4, 5, 6, 7, 8], [2, 3, 4, 5, 6, 7, 8, 9]])
    np.testing.assert_array_equal(ds.y_train, [[0], [1]])
    assert str(tmp_path / "pima-indians-diabetes.csv") in ds.source


def test_pima_user_file_bad_columns(tmp_path):
    (tmp_path / "pima-indians-diabetes.csv").write_text("1,2,3,4,5,6,7,8,0\n1,2,3\n")
    with pytest.raises(DataError, match="line 2: 3 columns"):
        load_dataset("pima", data_dir=tmp_path)


# ------------------------------------------------------------------------------------------- bundled MNIST
def test_bundled_mnist():
    ds = load_dataset("mnist")
    assert ds.x_train.shape == (4000, 28, 28, 1) and ds.x_test.shape == (1000, 28, 28, 1)
    assert ds.y_train.shape == (4000,) and ds.y_test.shape == (1000,)
    assert ds.x_train.dtype == np.float64 and ds.y_train.dtype == np.int64
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0 and 0 <= ds.x_test.min() <= ds.x_test.max() <= 1
    assert set(ds.y_train) == set(ds.y_test) == set(range(10))
    counts = np.bincount(np.concatenate([ds.y_train, ds.y_test]))
    np.testing.assert_array_equal(counts, [500] * 10)
    assert "models/bundled-data/mnist-5k" in ds.source and "seed 0" in ds.source and "4000/1000" in ds.source


def test_bundled_mnist_deterministic_and_fresh():
    a, b = load_dataset("mnist"), load_dataset("mnist")
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    a.x_train[0] = 7.0  # the arrays are the caller's own: no cached array is shared
    assert load_dataset("mnist").x_train[0].max() <= 1.0
    raw = read_idx(data.MNIST_5K_DIR / "labels-idx1-ubyte.gz")
    perm = np.random.default_rng(0).permutation(5000)
    np.testing.assert_array_equal(b.y_train, raw[perm[:4000]])


def test_bundled_mnist_corrupt(tmp_path, monkeypatch):
    shutil.copytree(data.MNIST_5K_DIR, tmp_path / "m5k")
    labels = tmp_path / "m5k" / "labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:-3])
    monkeypatch.setattr(data, "MNIST_5K_DIR", tmp_path / "m5k")
    with pytest.raises(DataError, match=data.MNIST_5K_SHA256["labels-idx1-ubyte.gz"]):
        load_dataset("mnist")


# --------------------------------------------------------------------------------------------------- read_idx
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_roundtrip(tmp_path, suffix):
    images, labels = synthetic_digits(7, 3)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / f"img{suffix}", images)), images)
    got = read_idx(write_idx(tmp_path / f"lab{suffix}", labels))
    np.testing.assert_array_equal(got, labels)
    assert got.dtype == np.uint8 and got.flags.writeable


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_truncated(tmp_path, suffix):
    raw = idx_bytes(synthetic_digits(4, 0)[0])[:-10]
    path = tmp_path / f"short{suffix}"
    path.write_bytes(gzip.compress(raw) if suffix else raw)
    with pytest.raises(DataError, match="short.*truncated"):
        read_idx(path)


def test_read_idx_cut_gzip(tmp_path):
    path = tmp_path / "cut.gz"
    path.write_bytes(gzip.compress(idx_bytes(synthetic_digits(4, 0)[0]))[:-20])
    with pytest.raises(DataError, match="cut.gz"):
        read_idx(path)


def test_read_idx_bad_magic(tmp_path):
    path = tmp_path / "notidx"
    path.write_bytes(b"\x00\x00\x08\x02" + (3).to_bytes(4, "big") * 2 + bytes(9))
    with pytest.raises(DataError, match="notidx.*magic number 0x802"):
        read_idx(path)


def test_read_idx_missing(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_idx(tmp_path / "nothing.gz")


# ------------------------------------------------------------------------------------------ MNIST search order
def test_mnist_from_idx_data_dir(tmp_path):
    arrays = write_idx_set(tmp_path / "d", gz=True)
    ds = load_dataset("mnist", data_dir=tmp_path / "d")
    check_images(ds, arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(ds.y_test, arrays["t10k-labels-idx1-ubyte"])
    assert ds.x_test.shape == (20, 28, 28, 1)
    assert str(tmp_path / "d") in ds.source and "IDX" in ds.source and "data_dir" in ds.source


def test_mnist_from_raw_idx_in_torchvision_layout(tmp_path):
    arrays = write_idx_set(tmp_path / "d" / "MNIST" / "raw", gz=False)
    ds = load_dataset("mnist", data_dir=str(tmp_path / "d"))
    check_images(ds, arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"])
    assert str(tmp_path / "d" / "MNIST" / "raw") in ds.source


def test_mnist_from_npz_in_data_dir(tmp_path):
    arrays = write_npz(tmp_path / "d" / "mnist.npz")
    write_idx_set(tmp_path / "d")  # mnist.npz wins over IDX files in the same folder
    ds = load_dataset("mnist", data_dir=tmp_path / "d")
    check_images(ds, arrays["x_train"], arrays["y_train"])
    assert ds.source.startswith(str(tmp_path / "d" / "mnist.npz"))


def test_mnist_from_keras_cache(isolated):
    arrays = write_npz(isolated / ".keras" / "datasets" / "mnist.npz")
    ds = load_dataset("mnist")
    check_images(ds, arrays["x_train"], arrays["y_train"])
    np.testing.assert_array_equal(ds.y_test, arrays["y_test"])
    assert str(isolated / ".keras" / "datasets" / "mnist.npz") in ds.source and "Keras" in ds.source


def test_mnist_from_torchvision_folder_in_cwd():
    arrays = write_idx_set(Path("data") / "MNIST" / "raw")
    ds = load_dataset("mnist")
    check_images(ds, arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"])
    assert "torchvision" in ds.source


def test_mnist_env_var_beats_keras_cache(tmp_path, isolated, monkeypatch):
    write_npz(isolated / ".keras" / "datasets" / "mnist.npz")
    arrays = write_idx_set(tmp_path / "envdir", n_train=11)
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "envdir"))
    ds = load_dataset("mnist")
    check_images(ds, arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"])
    assert data.ENV_VAR in ds.source


def test_mnist_data_dir_beats_env_var(tmp_path, monkeypatch):
    write_idx_set(tmp_path / "envdir", n_train=11)
    arrays = write_idx_set(tmp_path / "d", n_train=13)
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "envdir"))
    ds = load_dataset("mnist", data_dir=tmp_path / "d")
    assert len(ds.x_train) == 13
    check_images(ds, arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"])


def test_mnist_empty_env_dir_falls_through(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "empty"))
    assert "bundled" in load_dataset("mnist").source


def test_mnist_explicit_empty_data_dir_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as e:
        load_dataset("mnist", data_dir=tmp_path / "empty")
    msg = str(e.value)
    assert str(tmp_path / "empty" / "mnist.npz") in msg and "train-images-idx3-ubyte" in msg and "MNIST/raw" in msg


def test_mnist_missing_data_dir_is_an_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("mnist", data_dir=tmp_path / "nope")


def test_mnist_incomplete_idx_set(tmp_path):
    write_idx_set(tmp_path / "d")
    (tmp_path / "d" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="lacks t10k-labels-idx1-ubyte"):
        load_dataset("mnist", data_dir=tmp_path / "d")


def test_mnist_count_mismatch(tmp_path):
    write_idx_set(tmp_path / "d")
    write_idx(tmp_path / "d" / "train-labels-idx1-ubyte.gz", np.zeros(29, np.uint8))
    with pytest.raises(DataError, match=r"shape \(29,\) for 30 images"):
        load_dataset("mnist", data_dir=tmp_path / "d")


def test_mnist_refuses_fashion_files(tmp_path, monkeypatch):
    write_idx_set(tmp_path / "d")
    labels_sha = sha256_file(tmp_path / "d" / "train-labels-idx1-ubyte.gz")
    sums = {k: dict(v) for k, v in data.CHECKSUMS.items()}
    sums["fashion_mnist"]["train-labels-idx1-ubyte.gz"] = labels_sha  # pretend these are the official Fashion files
    monkeypatch.setattr(data, "CHECKSUMS", sums)
    with pytest.raises(DataError, match="holds Fashion-MNIST, not MNIST"):
        load_dataset("mnist", data_dir=tmp_path / "d")
    assert load_dataset("fashion_mnist", data_dir=tmp_path / "d").name == "fashion_mnist"


# ----------------------------------------------------------------------------------------------- Fashion-MNIST
def test_fashion_missing_says_apt_get():
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion_mnist")


def test_fashion_from_system_dir(tmp_path, monkeypatch):
    arrays = write_idx_set(tmp_path / "sys")
    monkeypatch.setattr(data, "FASHION_SYSTEM_DIR", tmp_path / "sys")
    ds = load_dataset("fashion_mnist")
    check_images(ds, arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"])
    assert ds.name == "fashion_mnist" and "dataset-fashion-mnist" in ds.source


def test_fashion_from_data_dir_subfolder(tmp_path):
    arrays = write_idx_set(tmp_path / "d" / "fashion-mnist")
    ds = load_dataset("fashion_mnist", data_dir=tmp_path / "d")
    check_images(ds, arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"])
    assert str(tmp_path / "d" / "fashion-mnist") in ds.source


# ------------------------------------------------------------------------------------------------------ fetch
@pytest.fixture
def server(tmp_path):
    """A local HTTP server on 127.0.0.1 serving tmp_path/www; yields (base_url, www, checksums of its .gz files)."""
    www = tmp_path / "www"
    write_idx_set(www, n_train=10, n_test=5)
    sums = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in www.iterdir()}

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(www)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/", www, sums
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def test_fetch_downloads_verifies_and_is_idempotent(tmp_path, server):
    base, www, sums = server
    dest = tmp_path / "dest"
    lines: list[str] = []
    paths = fetch("mnist", dest, base_url=base, checksums=sums, timeout=5, progress=lines.append)
    assert [p.name for p in paths] == [s + ".gz" for s in IDX_STEMS]
    for p in paths:
        assert p.read_bytes() == (www / p.name).read_bytes()
    assert sorted(x.name for x in dest.iterdir()) == sorted(sums)  # no temporary files left behind
    assert any("downloading" in line for line in lines)
    assert load_dataset("mnist", data_dir=dest).x_train.shape == (10, 28, 28, 1)

    for f in www.iterdir():
        f.unlink()  # a second call must not need the server's files
    lines.clear()
    assert fetch("mnist", dest, base_url=base, checksums=sums, timeout=5, progress=lines.append) == paths
    assert all("already present" in line for line in lines) and len(lines) == 4


def test_fetch_checksum_mismatch_keeps_nothing(tmp_path, server):
    base, _, sums = server
    bad = dict(sums, **{"train-labels-idx1-ubyte.gz": "0" * 64})
    dest = tmp_path / "dest"
    with pytest.raises(DataError) as e:
        fetch("mnist", dest, base_url=base, checksums=bad, timeout=5)
    msg = str(e.value)
    assert "train-labels-idx1-ubyte.gz" in msg and "0" * 64 in msg and sums["train-labels-idx1-ubyte.gz"] in msg
    assert not (dest / "train-labels-idx1-ubyte.gz").exists()
    assert sorted(x.name for x in dest.iterdir()) == ["train-images-idx3-ubyte.gz"]  # the good one before it


def test_fetch_http_404(tmp_path, server):
    base, www, sums = server
    (www / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError, match="404"):
        fetch("mnist", tmp_path / "dest", base_url=base, checksums=sums, timeout=5)
    assert not (tmp_path / "dest" / "t10k-images-idx3-ubyte.gz").exists()


def test_fetch_server_down(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: connections are refused
    dest = tmp_path / "dest"
    base = f"http://127.0.0.1:{port}/mnist/"
    with pytest.raises(DataError) as e:
        fetch("mnist", dest, base_url=base, timeout=2)
    msg = str(e.value)
    assert str(dest) in msg and "--data-dir" in msg and data.ENV_VAR in msg
    for stem in IDX_STEMS:
        assert f"{base}{stem}.gz" in msg
    assert list(dest.iterdir()) == []


def test_fetch_rejects_bundled_and_unknown(tmp_path):
    with pytest.raises(DataError, match="nothing to download"):
        fetch("pima", tmp_path)
    with pytest.raises(DataError, match="valid names"):
        fetch("imagenet", tmp_path)


def test_default_checksums_cover_both_datasets():
    for name in ("mnist", "fashion_mnist"):
        assert sorted(data.CHECKSUMS[name]) == sorted(s + ".gz" for s in IDX_STEMS)
        assert all(len(v) == 64 and int(v, 16) >= 0 for v in data.CHECKSUMS[name].values())


def test_or_gate():
    ds = load_dataset("or_gate")
    assert ds.x_train.tolist() == [[0, 0, 1], [0, 1, 1], [1, 0, 1], [1, 1, 1]] and ds.y_train.ravel().tolist() == [0, 1, 1, 1]
