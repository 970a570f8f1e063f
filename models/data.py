"""The data sets the built-in models train on, loaded into NumPy arrays (stdlib + NumPy only).

* ``toy_431``: the 3-sample toy set of the 4-3-1 tutorial, defined here.
* ``or_gate``: the OR truth table of the TF1 perceptron tutorial (inputs with a constant third 1), defined here.
* ``pima``: the Pima Indians Diabetes CSV bundled in ``models/bundled-data/`` (sha256 checked on every load), or a user's own
  ``pima-indians-diabetes.csv`` in ``data_dir`` / ``$DLCOMPARE_DATA_DIR``.
* ``mnist``: the first of ``data_dir``, ``$DLCOMPARE_DATA_DIR``, Keras' ``~/.keras/datasets/mnist.npz``, a torchvision
  ``./data/MNIST/raw`` folder, and finally the bundled 5,000-digit subset (shuffled with seed 0, split 4,000 / 1,000).
* ``fashion_mnist``: ``data_dir``, ``$DLCOMPARE_DATA_DIR``, the Debian package ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist``), Keras' ``~/.keras/datasets/fashion-mnist``, ``./data/FashionMNIST/raw``.

A directory given for MNIST may hold ``mnist.npz``, the four standard IDX files (``.gz`` or raw), or an ``MNIST/raw`` or
``mnist`` subfolder with them; for Fashion-MNIST the IDX files, or a ``fashion-mnist``, ``fashion_mnist`` or
``FashionMNIST/raw`` subfolder.  Both data sets use the same four file names, so IDX files at the root of a folder are
taken as whichever data set was asked for, except that a ``train-labels-idx1-ubyte.gz`` whose sha256 is the other
data set's official one is refused.  :func:`fetch` downloads the official files, checking their sha256.

Every data problem raises :class:`DataError`, whose message says what was found, what was expected and how to fix it.
Images come back as float64 in [0, 1], shaped (N, 28, 28, 1) (NHWC), with int64 labels of shape (N,).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import os
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from functools import lru_cache
from http.client import HTTPException
from pathlib import Path
from typing import Callable

import numpy as np

DATASETS: tuple[str, ...] = ("toy_431", "or_gate", "pima", "mnist", "fashion_mnist")
ENV_VAR = "DLCOMPARE_DATA_DIR"

# Module-level paths, so that tests (and odd installations) can point them elsewhere.
BUNDLED_DIR = Path(__file__).resolve().parent / "bundled-data"
PIMA_CSV = BUNDLED_DIR / "pima-indians-diabetes.csv"
PIMA_SHA256 = "33e704cdafa8769a75728e4658dcce5bc1da1ce36174603687fe545f46e39394"
MNIST_5K_DIR = BUNDLED_DIR / "mnist-5k"
MNIST_5K_SHA256 = {
    "images-idx3-ubyte.gz": "35c4442b3738be6b58df4ff21f19341f0368e1c3d24840252fb3ff06ba646387",
    "labels-idx1-ubyte.gz": "abdbe68beb8b8e1983d8086fdcb07e198f851fb0c1af91276c18f154ef0b67d8",
}
MNIST_5K_SEED = 0
MNIST_5K_TRAIN = 4000
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

DEFAULT_BASE_URLS = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",  # torchvision's mirror
    "fashion_mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",  # Zalando's (HTTP only)
}
# sha256 of the official .gz files, as listed by tensorflow_datasets (tensorflow_datasets/url_checksums/mnist.txt and
# fashion_mnist.txt) and identically by several independent projects.
CHECKSUMS: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    },
}

_IDX_MAGIC = {0x801: 1, 0x803: 3}  # unsigned-byte labels (1 dim) / images (3 dims)
_PRETTY = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}


class DataError(ValueError):
    """A data set is missing, corrupt or not what was expected; the message says how to fix it."""


@dataclass(frozen=True, eq=False)
class Dataset:
    name: str
    x_train: np.ndarray  # float64; images (N, 28, 28, 1) in [0, 1]; pima (768, 8) unscaled; toy (3, 4)
    y_train: np.ndarray  # images: int64 labels (N,); pima / toy: float64 targets (N, 1)
    x_test: np.ndarray | None  # None where the data set has no test split (toy, pima)
    y_test: np.ndarray | None
    source: str  # human-readable: which file(s) or folder the arrays came from

    def __repr__(self) -> str:
        test = "no test split" if self.x_test is None else f"x_test {self.x_test.shape}"
        return f"Dataset({self.name!r}, x_train {self.x_train.shape}, {test}, source={self.source!r})"


# ------------------------------------------------------------------------------------------------------ files
def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzip-compressed or raw) of unsigned bytes: labels (magic 0x801) or images (magic 0x803)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
    except FileNotFoundError:
        raise DataError(f"IDX file {path} does not exist") from None
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(
            f"{path} is not a readable gzip file ({e}); it is probably truncated, delete it and download it again"
        ) from None
    if len(data) < 8:
        raise DataError(
            f"{path} is {len(data)} bytes long after decompression, too short for an IDX header; "
            "the file is truncated or not an IDX file"
        )
    magic = int.from_bytes(data[:4], "big")
    if magic not in _IDX_MAGIC:
        raise DataError(
            f"{path} has magic number {magic:#x}; expected 0x801 (labels) or 0x803 (images) of the IDX "
            "format (e.g. train-images-idx3-ubyte.gz); is this the right file?"
        )
    ndim = _IDX_MAGIC[magic]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path} ends inside its IDX header ({len(data)} bytes); the file is truncated")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "longer than its header says"
        raise DataError(
            f"{path} is {what}: its header promises shape {dims}, i.e. {expected} bytes, but it has "
            f"{len(data)} bytes (after decompression); delete it and download it again"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


@lru_cache(maxsize=16)
def _read_idx_cached(path: str, mtime_ns: int, size: int) -> np.ndarray:
    arr = read_idx(path)
    arr.setflags(write=False)
    return arr


@lru_cache(maxsize=16)
def _sha256_cached(path: str, mtime_ns: int, size: int) -> str:
    return sha256_file(path)


def _stat_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_mtime_ns, st.st_size


def _idx(path: Path) -> np.ndarray:
    """read_idx, cached on (path, mtime, size): a second load in the same process skips the decompression."""
    return _read_idx_cached(*_stat_key(path))


def _check_sha256(path: Path, expected: str, how_to_fix: str) -> None:
    if not path.is_file():
        raise DataError(f"{path} is missing; {how_to_fix}")
    actual = sha256_file(path)
    if actual != expected:
        raise DataError(
            f"{path} has sha256 {actual}, expected {expected}; the file is corrupt or was changed. {how_to_fix}"
        )


# ------------------------------------------------------------------------------------------------- data sets
def _toy() -> Dataset:
    x = np.array([[1, 0, 1, 0], [1, 0, 1, 1], [0, 1, 0, 1]], dtype=np.float64)
    y = np.array([[1], [1], [0]], dtype=np.float64)
    return Dataset("toy_431", x, y, None, None, "defined in models/data.py (the 4-3-1 tutorial's X and y)")


def _or_gate() -> Dataset:
    x = np.array([[0, 0, 1], [0, 1, 1], [1, 0, 1], [1, 1, 1]], dtype=np.float64)  # the third input is a constant 1
    y = np.array([[0], [1], [1], [1]], dtype=np.float64)
    return Dataset("or_gate", x, y, None, None, "defined in models/data.py (the TF1 perceptron tutorial's OR gate)")


def _read_pima_csv(path: Path) -> np.ndarray:
    rows = []
    with open(path, newline="") as f:
        for lineno, row in enumerate(csv.reader(f), start=1):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != 9:
                raise DataError(
                    f"{path}, line {lineno}: {len(row)} columns; expected the 9 columns of the Pima CSV "
                    "(8 features, then the 0/1 class), comma-separated, no header"
                )
            try:
                rows.append([float(c) for c in row])
            except ValueError:
                raise DataError(
                    f"{path}, line {lineno}: non-numeric value in {row!r}; expected 9 numbers per line "
                    "and no header line"
                ) from None
    if not rows:
        raise DataError(f"{path} holds no data rows; expected 9 comma-separated numbers per line")
    data = np.array(rows, dtype=np.float64)
    if not np.isfinite(data).all():
        raise DataError(f"{path} holds NaN or infinite values; expected finite numbers")
    return data


def _pima(dirs: list[tuple[Path, str]]) -> Dataset:
    for d, how in dirs:
        user = d / "pima-indians-diabetes.csv"
        if user.is_file():
            data, source = _read_pima_csv(user), f"{user} (from {how})"
            break
    else:
        fix = (
            "reinstall dlcompare or restore the file from git (`git checkout -- models/bundled-data`), or put your own "
            f"pima-indians-diabetes.csv in a folder given by --data-dir or ${ENV_VAR}"
        )
        _check_sha256(PIMA_CSV, PIMA_SHA256, fix)
        data, source = _read_pima_csv(PIMA_CSV), f"bundled {PIMA_CSV.name} (models/bundled-data), sha256 verified"
    return Dataset("pima", data[:, :8].copy(), data[:, 8:].copy(), None, None, source)


def _to_images(x: np.ndarray, where: str) -> np.ndarray:
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim != 3 or x.shape[1:] != (28, 28):
        raise DataError(f"{where}: images have shape {x.shape}; expected (N, 28, 28) or (N, 28, 28, 1)")
    if not np.issubdtype(x.dtype, np.integer) or (x.size and (x.min() < 0 or x.max() > 255)):
        span = f" in [{x.min()}, {x.max()}]" if x.size else ""
        raise DataError(f"{where}: images are {x.dtype}{span}; expected unsigned bytes 0..255 (they are scaled here)")
    return (x.astype(np.float64) / 255.0)[..., None]


def _to_labels(y: np.ndarray, n: int, where: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n:
        raise DataError(f"{where}: labels have shape {y.shape} for {n} images; expected ({n},)")
    if not np.issubdtype(y.dtype, np.integer) or (n and (y.min() < 0 or y.max() > 9)):
        span = f" in [{y.min()}, {y.max()}]" if n else ""
        raise DataError(f"{where}: labels are {y.dtype}{span}; expected integers 0..9")
    return y.astype(np.int64)


def _find_idx(d: Path) -> tuple[dict[str, Path], list[str]]:
    """The standard IDX files in ``d`` (``.gz`` preferred) and the names of those missing."""
    found, missing = {}, []
    for stem in IDX_FILES:
        for cand in (d / f"{stem}.gz", d / stem):
            if cand.is_file():
                found[stem] = cand
                break
        else:
            missing.append(stem)
    return found, missing


def _load_idx_dir(name: str, d: Path, files: dict[str, Path], how: str) -> Dataset:
    arrays = {}
    for stem in IDX_FILES:
        arrays[stem] = _idx(files[stem])
    where = f"{_PRETTY[name]} IDX files in {d}"
    x_train = _to_images(arrays["train-images-idx3-ubyte"], where)
    x_test = _to_images(arrays["t10k-images-idx3-ubyte"], where)
    y_train = _to_labels(arrays["train-labels-idx1-ubyte"], len(x_train), where + " (train)")
    y_test = _to_labels(arrays["t10k-labels-idx1-ubyte"], len(x_test), where + " (t10k)")
    return Dataset(name, x_train, y_train, x_test, y_test, f"{where} (from {how})")


def _load_npz(name: str, path: Path, how: str) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test") if k in z.files}
            keys = z.files
    except (OSError, ValueError, EOFError, zlib.error) as e:
        raise DataError(f"{path} is not a readable .npz file ({e}); delete it or download it again") from None
    if len(arrays) != 4:
        raise DataError(
            f"{path} has arrays {keys}; expected Keras' mnist.npz layout with x_train, y_train, x_test, y_test"
        )
    x_train, x_test = _to_images(arrays["x_train"], str(path)), _to_images(arrays["x_test"], str(path))
    y_train = _to_labels(arrays["y_train"], len(x_train), f"{path} (y_train)")
    y_test = _to_labels(arrays["y_test"], len(x_test), f"{path} (y_test)")
    return Dataset(name, x_train, y_train, x_test, y_test, f"{path} (from {how})")


def _idx_layouts(name: str, d: Path) -> list[Path]:
    if name == "mnist":
        return [d, d / "MNIST" / "raw", d / "mnist"]
    return [d, d / "fashion-mnist", d / "fashion_mnist", d / "FashionMNIST" / "raw"]


def _other_dataset(name: str, files: dict[str, Path]) -> str | None:
    """The other IDX data set, if the train labels are byte for byte its official file (a cheap 30 kB hash)."""
    labels = files["train-labels-idx1-ubyte"]
    if labels.suffix != ".gz":
        return None
    actual = _sha256_cached(*_stat_key(labels))
    for other, sums in CHECKSUMS.items():
        if other != name and sums["train-labels-idx1-ubyte.gz"] == actual:
            return other
    return None


def _search_dir(name: str, d: Path, how: str, looked: list[str]) -> Dataset | None:
    """Load ``name`` from the first usable layout under ``d``; None (with ``looked`` extended) if there is none."""
    if name == "mnist":
        if d.is_file() and d.suffix == ".npz":
            return _load_npz(name, d, how)
        npz = d / "mnist.npz"
        if npz.is_file():
            return _load_npz(name, npz, how)
        looked.append(str(npz))
    for sub in _idx_layouts(name, d):
        files, missing = _find_idx(sub)
        if not files:
            looked.append(f"{sub}/{{{','.join(IDX_FILES)}}}[.gz]")
            continue
        if missing:
            raise DataError(
                f"{sub} has {', '.join(p.name for p in files.values())} but lacks "
                f"{', '.join(missing)} (.gz or raw); {_PRETTY[name]} needs all four IDX files"
            )
        other = _other_dataset(name, files)
        if other is not None:
            looked.append(f"{sub} (holds {_PRETTY[other]}, not {_PRETTY[name]})")
            continue
        return _load_idx_dir(name, sub, files, how)
    return None


def _user_dirs(data_dir: str | os.PathLike | None) -> list[tuple[Path, str]]:
    dirs = []
    if data_dir is not None and str(data_dir) != "":
        dirs.append((Path(data_dir).expanduser(), "data_dir"))
    env = os.environ.get(ENV_VAR, "")
    if env:
        dirs.append((Path(env).expanduser(), f"${ENV_VAR}"))
    return dirs


def _explicit_miss(name: str, d: Path, looked: list[str]) -> DataError:
    hint = (
        "`harness data fetch mnist --dest DIR`"
        if name == "mnist"
        else "`apt-get install dataset-fashion-mnist` (then leave out --data-dir)"
    )
    return DataError(
        f"no {_PRETTY[name]} data in data_dir {d}; looked for:\n  "
        + "\n  ".join(looked)
        + f"\nPut the files there, point --data-dir elsewhere, or get them with {hint}."
    )


def _images(name: str, data_dir: str | os.PathLike | None) -> Dataset:
    looked: list[str] = []
    for d, how in _user_dirs(data_dir):
        if how == "data_dir" and not d.exists():
            raise DataError(
                f"data_dir {d} does not exist; expected a folder with the {_PRETTY[name]} files "
                "(see models/data.py's docstring), or leave --data-dir out"
            )
        start = len(looked)
        ds = _search_dir(name, d, how, looked)
        if ds is not None:
            return ds
        if how == "data_dir":
            raise _explicit_miss(name, d, looked[start:])

    home, cwd = Path.home(), Path.cwd()
    if name == "mnist":
        fallbacks = [
            (home / ".keras" / "datasets" / "mnist.npz", "the Keras cache"),
            (cwd / "data" / "MNIST" / "raw", "a torchvision folder"),
        ]
    else:
        fallbacks = [
            (FASHION_SYSTEM_DIR, "the Debian package dataset-fashion-mnist"),
            (home / ".keras" / "datasets" / "fashion-mnist", "the Keras cache"),
            (cwd / "data" / "FashionMNIST" / "raw", "a torchvision folder"),
        ]
    for path, how in fallbacks:
        if path.suffix == ".npz":
            if path.is_file():
                return _load_npz(name, path, how)
            looked.append(str(path))
            continue
        files, missing = _find_idx(path)
        if files and not missing:
            return _load_idx_dir(name, path, files, how)
        looked.append(f"{path}/{{{','.join(IDX_FILES)}}}[.gz]")

    if name == "mnist":
        return _bundled_mnist()
    raise DataError(
        "Fashion-MNIST not found; looked for:\n  "
        + "\n  ".join(looked)
        + "\nInstall it with `apt-get install dataset-fashion-mnist`, or pass --data-dir (or set "
        f"${ENV_VAR}) to a folder with train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz."
    )


def _bundled_mnist() -> Dataset:
    fix = "reinstall dlcompare or restore the folder from git (`git checkout -- models/bundled-data/mnist-5k`)"
    paths = {}
    for fname, expected in MNIST_5K_SHA256.items():
        path = MNIST_5K_DIR / fname
        if not path.is_file():
            raise DataError(f"bundled MNIST subset file {path} is missing; {fix}")
        actual = _sha256_cached(*_stat_key(path))
        if actual != expected:
            raise DataError(
                f"{path} has sha256 {actual}, expected {expected}; the file is corrupt or was changed. {fix}"
            )
        paths[fname] = path
    where = f"bundled MNIST 5k subset ({MNIST_5K_DIR})"
    x = _to_images(_idx(paths["images-idx3-ubyte.gz"]), where)
    y = _to_labels(_idx(paths["labels-idx1-ubyte.gz"]), len(x), where)
    perm = np.random.default_rng(MNIST_5K_SEED).permutation(len(x))
    x, y = x[perm], y[perm]
    n = MNIST_5K_TRAIN
    source = f"bundled MNIST 5k subset (models/bundled-data/mnist-5k), shuffled seed {MNIST_5K_SEED}, split {n}/{len(x) - n}"
    return Dataset("mnist", x[:n], y[:n], x[n:], y[n:], source)


def load_dataset(name: str, data_dir: str | os.PathLike | None = None) -> Dataset:
    """Load a data set by name (one of :data:`DATASETS`); see the module docstring for where each one is looked for.

    ``data_dir`` (else ``$DLCOMPARE_DATA_DIR``) is searched first.  For the image data sets an explicit ``data_dir``
    with nothing usable in it is an error; an environment variable pointing at a folder without them is not.
    The arrays are fresh on every call (the decompressed IDX bytes are cached per process).
    """
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; valid names: {', '.join(DATASETS)}")
    if name == "toy_431":
        return _toy()
    if name == "or_gate":
        return _or_gate()
    if name == "pima":
        return _pima(_user_dirs(data_dir))
    return _images(name, data_dir)


# ---------------------------------------------------------------------------------------------------- fetch
def fetch(
    name: str,
    dest_dir: str | os.PathLike,
    base_url: str | None = None,
    checksums: dict[str, str] | None = None,
    timeout: float = 30.0,
    progress: Callable[[str], None] | None = None,
) -> list[Path]:
    """Download the four official IDX ``.gz`` files of ``name`` ("mnist" or "fashion_mnist") into ``dest_dir``.

    Each file is written to a temporary file in ``dest_dir`` and renamed into place only once its sha256 matches
    ``checksums`` (default: the official ones); a file already there with the right sha256 is kept.  Returns the four
    paths, after which ``load_dataset(name, data_dir=dest_dir)`` loads them.
    """
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; valid names: {', '.join(DATASETS)}")
    if name not in CHECKSUMS:
        raise DataError(
            f"{name!r} is bundled with dlcompare (models/bundled-data); there is nothing to download. "
            f"fetch() downloads {' and '.join(CHECKSUMS)}"
        )
    say = progress or (lambda line: None)
    base = base_url or DEFAULT_BASE_URLS[name]
    base = base if base.endswith("/") else base + "/"
    sums = CHECKSUMS[name] if checksums is None else checksums
    fnames = [f"{stem}.gz" for stem in IDX_FILES]
    absent = [f for f in fnames if f not in sums]
    if absent:
        raise DataError(f"checksums has no sha256 for {', '.join(absent)}; expected one for each of {fnames}")
    dest = Path(dest_dir).expanduser()
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the download folder {dest} ({e}); pass another dest_dir") from None

    paths = []
    for fname in fnames:
        final, url, expected = dest / fname, base + fname, sums[fname].lower()
        if final.is_file():
            if sha256_file(final) == expected:
                say(f"{final}: already present, sha256 ok")
                paths.append(final)
                continue
            say(f"{final}: sha256 differs from the expected one, downloading it again")
        say(f"downloading {url}")
        _download(url, final, expected, timeout, name, base, fnames, dest)
        say(f"{final}: sha256 ok ({final.stat().st_size:,} bytes)")
        paths.append(final)
    return paths


def _download(
    url: str, final: Path, expected: str, timeout: float, name: str, base: str, fnames: list[str], dest: Path
) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".part", dir=dest)
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp:
                    for block in iter(lambda: resp.read(1 << 20), b""):
                        h.update(block)
                        out.write(block)
            except (urllib.error.URLError, HTTPException, OSError, ValueError) as e:
                reason = e if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", None) or e
                urls = "\n  ".join(base + f for f in fnames)
                raise DataError(
                    f"could not download {url}: {reason}.\n"
                    f"Download the {_PRETTY[name]} files yourself:\n  {urls}\n"
                    f"and put them in {dest} (or any folder, then pass --data-dir or set ${ENV_VAR} to it)."
                ) from None
        actual = h.hexdigest()
        if actual != expected:
            raise DataError(
                f"downloaded {url} has sha256 {actual}, expected {expected}; the file was not kept "
                f"as {final}. The mirror may be serving a different file: try again or another "
                "base_url."
            )
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
