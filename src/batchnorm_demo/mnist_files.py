"""Full MNIST from local files: IDX files (gzipped or not) or a Keras-style ``.npz``, and the
optional checksummed download of the IDX files (:func:`download_mnist`); see
:mod:`batchnorm_demo.data`."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path

import numpy as np

from .dataset import Dataset

__all__ = ["MNIST_FILES", "MNIST_MIRROR", "download_mnist", "load_mnist_files", "read_idx"]

MNIST_FILES = {
    "train_images": ("train-images-idx3-ubyte", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
    "train_labels": ("train-labels-idx1-ubyte", "d53e105ee54ea40749a09fcbcd1e9432"),
    "test_images": ("t10k-images-idx3-ubyte", "9fb629c4189551a2d022fa330f9573f3"),
    "test_labels": ("t10k-labels-idx1-ubyte", "ec29112dd5afa0611ce80d1b7f02629c"),
}
MNIST_MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"

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
