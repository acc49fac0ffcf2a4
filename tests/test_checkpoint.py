"""Checkpoint files against hostile input: members, metadata, size caps, modes, temporaries."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
from numpy.lib import format as npy_format

import batchnorm as bn
from batchnorm import _checkpoint_io, _checkpoint_write, checkpoint

POSIX = os.name == "posix"


def _state():
    return {
        "gamma": np.array([1.0, 2.0, 3.0]),
        "running_var": np.array([0.5, 1.5, 2.5], dtype=np.float32),
        "num_batches_tracked": 7,
    }


def _write_npz(path, **members):
    """An npz written by NumPy itself (no checks of ours involved)."""
    np.savez(path, **members)
    return path


def _bomb(path, declared_bytes, compress=zipfile.ZIP_DEFLATED):
    """A zip member holding a valid .npy of zeros: tiny on disk, ``declared_bytes`` inside."""
    count = declared_bytes // 8
    with zipfile.ZipFile(path, "w", compress) as zf:
        with zf.open("gamma.npy", "w", force_zip64=True) as fp:
            npy_format.write_array_header_1_0(
                fp, {"descr": "<f8", "fortran_order": False, "shape": (count,)}
            )
            chunk = bytes(1 << 20)
            left = count * 8
            while left:
                fp.write(chunk[: min(left, len(chunk))])
                left -= min(left, len(chunk))
    return path


def _member(arr):
    import io

    buf = io.BytesIO()
    npy_format.write_array(buf, arr, allow_pickle=False)
    return buf.getvalue()


# ----------------------------------------------------------------------------- 1. members
def test_npz_with_a_non_array_member_is_refused_naming_it(tmp_path):
    path = tmp_path / "bn.npz"
    checkpoint.save_npz(path, _state(), meta={"batchnorm": {"class": "BatchNorm"}})
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("notes.txt", "hello")
    with pytest.raises(ValueError, match=r"bn\.npz.*'notes\.txt' is not a \.npy array"):
        checkpoint.load_state(path)
    with pytest.raises(ValueError, match="notes.txt"):
        bn.BatchNorm(3).load(path)


@pytest.mark.parametrize(
    "members, match",
    [
        ({"gamma": np.array(["a", "b"])}, r"'gamma\.npy' has dtype <U1"),
        ({"gamma": np.array([1 + 2j])}, r"'gamma\.npy' has dtype complex128"),
        ({"gamma": np.zeros(2, dtype=[("a", "<f8")])}, r"'gamma\.npy' has dtype"),
        ({"__meta__": np.array(["{}"])}, r"must be a 0-d unicode string.*shape \(1,\)"),
        ({"__meta__": np.array(3)}, r"must be a 0-d unicode string; it is int64"),
    ],
)
def test_npz_members_must_be_numeric_arrays_and_meta_a_string(tmp_path, members, match):
    path = _write_npz(tmp_path / "x.npz", **members)
    with pytest.raises(ValueError, match=match):
        checkpoint.load_npz(path)


def test_object_arrays_and_other_members_never_unpickle(tmp_path):
    path = _write_npz(tmp_path / "obj.npz", gamma=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="pickle, which is never used"):
        checkpoint.load_npz(path)
    with zipfile.ZipFile(tmp_path / "dir.npz", "w") as zf:
        zf.writestr("sub/", "")
        zf.writestr("gamma.npy", _member(np.ones(2)))
    with pytest.raises(ValueError, match="'sub/' is not a .npy array"):
        checkpoint.load_npz(tmp_path / "dir.npz")
    with zipfile.ZipFile(tmp_path / "dup.npz", "w") as zf:
        zf.writestr("gamma.npy", _member(np.ones(2)))
        with pytest.warns(UserWarning, match="Duplicate name"):
            zf.writestr("gamma.npy", _member(np.zeros(2)))
    with pytest.raises(ValueError, match=r"\['gamma.npy'\] occur more than once"):
        checkpoint.load_npz(tmp_path / "dup.npz")


# ----------------------------------------------------------------------------- 2. metadata
@pytest.mark.parametrize(
    "text, found", [("3", "int"), ("[1, 2]", "list"), ('"s"', "str"), ("null", "NoneType")]
)
def test_metadata_must_be_a_json_object(tmp_path, text, found):
    path = _write_npz(tmp_path / "m.npz", gamma=np.ones(2), __meta__=np.array(text))
    with pytest.raises(ValueError, match=rf"m\.npz: metadata .* JSON object; found a {found}"):
        checkpoint.load_state(path)
    pytest.importorskip("safetensors")
    import safetensors.numpy as stn

    st = tmp_path / "m.safetensors"
    st.write_bytes(stn.save({"gamma": np.ones(2)}, metadata={"__meta__": text}))
    with pytest.raises(ValueError, match=rf"m\.safetensors: .* JSON object; found a {found}"):
        checkpoint.load_state(st)


def test_metadata_that_is_not_json_or_too_deep(tmp_path):
    path = _write_npz(tmp_path / "m.npz", __meta__=np.array("{oops"))
    with pytest.raises(ValueError, match=r"m\.npz: metadata '__meta__' is not valid JSON"):
        checkpoint.load_state(path)
    path = _write_npz(tmp_path / "deep.npz", __meta__=np.array("[" * 100_000))
    with pytest.raises(ValueError, match="not valid JSON"):
        checkpoint.load_state(path)


def test_load_state_returns_meta_dict_or_none(tmp_path):
    checkpoint.save_state(tmp_path / "a.npz", _state())
    assert checkpoint.load_state(tmp_path / "a.npz")[1] is None
    checkpoint.save_state(tmp_path / "b.npz", _state(), meta={"k": [1, 2]})
    assert checkpoint.load_state(tmp_path / "b.npz")[1] == {"k": [1, 2]}


GOOD_CFG = {"class": "BatchNorm", "num_features": [3], "convention": "keras"}


def test_layer_config_accepts_and_copies():
    meta = {"batchnorm": dict(GOOD_CFG)}
    cfg = checkpoint.layer_config(meta, "f.npz", _state() | {"beta": np.zeros(3)})
    assert cfg == GOOD_CFG
    cfg.pop("class")
    assert meta["batchnorm"] == GOOD_CFG  # the caller may pop from the copy
    layer = bn.BatchNorm(3)
    meta = {"batchnorm": layer.config()}
    assert checkpoint.layer_config(meta, "f.npz", layer.state_dict()) == layer.config()


@pytest.mark.parametrize(
    "meta, match",
    [
        (None, "holds no layer configuration"),
        ({"other": 1}, "holds no layer configuration"),
        ({"batchnorm": [1]}, "'batchnorm' must be an object; got \\[1\\]"),
        ({"batchnorm": {"num_features": [3]}}, "'batchnorm.class' must be a class name; got None"),
        ({"batchnorm": {"class": 5, "num_features": [3]}}, "got 5"),
        ({"batchnorm": {"class": "BatchNorm"}}, "num_features' must be a list .* got None"),
        ({"batchnorm": GOOD_CFG | {"num_features": []}}, r"got \[\]"),
        ({"batchnorm": GOOD_CFG | {"num_features": 3}}, "got 3"),
        ({"batchnorm": GOOD_CFG | {"num_features": [0]}}, r"got \[0\]"),
        ({"batchnorm": GOOD_CFG | {"num_features": [-2]}}, r"got \[-2\]"),
        ({"batchnorm": GOOD_CFG | {"num_features": [2.5]}}, r"got \[2.5\]"),
        ({"batchnorm": GOOD_CFG | {"num_features": [True]}}, r"got \[True\]"),
        ({"batchnorm": GOOD_CFG | {"num_features": [1] * 33}}, r"1 to 32 positive ints"),
        ({"batchnorm": GOOD_CFG | {"num_features": [20_000_000]}}, "20000000 features; at most"),
        ({"batchnorm": GOOD_CFG | {"num_features": [10**13]}}, "10000000000000 features"),
        ({"batchnorm": GOOD_CFG | {"num_features": [4096, 8192]}}, "33554432 features"),
    ],
)
def test_layer_config_refuses_naming_path_and_field(meta, match):
    with pytest.raises(ValueError, match=r"^ck\.npz.*" + match):
        checkpoint.layer_config(meta, "ck.npz")


def test_layer_config_checks_the_stored_shapes_first():
    meta = {"batchnorm": GOOD_CFG | {"num_features": [2_000_000]}}
    with pytest.raises(
        ValueError,
        match=r"ck\.npz: state\['gamma'\] has shape \(3,\) but .*"
        r"declares \(2000000,\)",
    ):
        checkpoint.layer_config(meta, "ck.npz", _state())


# ----------------------------------------------------------------------------- 3. not an npz
@pytest.mark.parametrize(
    "content", [b"# batchnorm\n\nBatch Normalization by hand.\n", bytes(range(256)) * 4, b""]
)
def test_a_file_that_is_not_a_zip_archive(tmp_path, content):
    path = tmp_path / "README.md"
    path.write_bytes(content)
    with pytest.raises(
        ValueError,
        match=r"README\.md is not a readable npz checkpoint: it is "
        "not a zip archive",
    ) as info:
        checkpoint.load_state(path)
    assert "allow_pickle" not in str(info.value) and "pickle" not in str(info.value)


# ----------------------------------------------------------------------------- 4. size caps
def test_npz_bomb_is_refused_from_its_declared_size(tmp_path):
    path = _bomb(tmp_path / "bomb.npz", 40 << 20)
    assert path.stat().st_size < 100_000
    with pytest.raises(
        ValueError,
        match=rf"declare {(40 << 20) + 128} bytes uncompressed; the "
        r"limit is max_bytes=1048576",
    ):
        checkpoint.load_npz(path, max_bytes=1 << 20)
    assert checkpoint.load_npz(path, max_bytes=64 << 20)[0]["gamma"].shape == (5 << 20,)


_RSS_SCRIPT = """
import resource, sys
from batchnorm import checkpoint
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    checkpoint.load_state(sys.argv[1], max_bytes=int(sys.argv[2]))
    print("loaded", end=" ")
except ValueError:
    print("refused", end=" ")
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss in KiB on Linux")
def test_npz_bomb_does_not_grow_memory(tmp_path):
    path = _bomb(tmp_path / "bomb.npz", 48 << 20)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(path), str(8 << 20)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout.split()
    assert out[0] == "refused"
    assert int(out[1]) < 8 << 10  # KiB: far below the 48 MiB the file declares


def test_zip_directory_and_file_size_are_capped(tmp_path, monkeypatch):
    path = tmp_path / "bn.npz"
    checkpoint.save_state(path, _state())
    monkeypatch.setattr(_checkpoint_io, "MAX_ZIP_DIRECTORY_BYTES", 100)
    with pytest.raises(
        ValueError, match=r"bn\.npz .* zip directory declares \d+ bytes \(3 members\)"
    ):
        checkpoint.load_state(path)
    monkeypatch.undo()
    big = tmp_path / "big.npz"
    checkpoint.save_state(big, {"g": np.zeros(600_000)})
    with pytest.raises(
        ValueError,
        match=r"big\.npz .* the file has 4800\d+ bytes; the limit is "
        "max_bytes=0",
    ):
        checkpoint.load_state(big, max_bytes=0)
    with pytest.raises(TypeError, match="max_bytes must be an int; got float"):
        checkpoint.load_state(path, max_bytes=1e9)
    with pytest.raises(ValueError, match="max_bytes must be >= 0; got -1"):
        checkpoint.load_state(path, max_bytes=-1)


def test_npy_header_must_match_the_member_size(tmp_path):
    huge = npy_format.header_data_from_array_1_0(np.ones(3))
    huge["shape"] = (10**13,)
    with zipfile.ZipFile(tmp_path / "liar.npz", "w") as zf:
        with zf.open("gamma.npy", "w") as fp:
            npy_format.write_array_header_1_0(fp, huge)
            fp.write(np.ones(3).tobytes())
    with pytest.raises(
        ValueError,
        match=r"liar\.npz.*'gamma\.npy' declares shape "
        r"\(10000000000000,\) of float64 \(80000000000000 bytes\) but holds 24",
    ):
        checkpoint.load_npz(tmp_path / "liar.npz")


def _safetensors_file(path, header, data=b""):
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)
    return path


@pytest.mark.parametrize(
    "header, data, match",
    [
        (
            {"g": {"dtype": "F64", "shape": [10**12], "data_offsets": [0, 8 * 10**12]}},
            bytes(8),
            r"declare 8000000000000 bytes; the limit is max_bytes",
        ),
        (
            {"g": {"dtype": "F64", "shape": [10**12], "data_offsets": [0, 8]}},
            bytes(8),
            r"'g' declares shape \(1000000000000,\) of F64 \(8000000000000 bytes\)",
        ),
        (
            {"g": {"dtype": "F64", "shape": [2], "data_offsets": [0, 16]}},
            bytes(8),
            "declare 16 bytes of data but the file holds 8",
        ),
        (
            {"g": {"dtype": "F64", "shape": [1], "data_offsets": [8, 16]}},
            bytes(16),
            "'g' starts at data offset 8, expected 0",
        ),
        (
            {
                "g": {"dtype": "F64", "shape": [1], "data_offsets": [0, 8]},
                "h": {"dtype": "F64", "shape": [1], "data_offsets": [0, 8]},
            },
            bytes(8),
            "starts at data offset 0, expected 8",
        ),
        ({"g": {"dtype": "BF16", "shape": [1], "data_offsets": [0, 2]}}, bytes(2), "'BF16'"),
        ({"g": {"dtype": "F64", "shape": [-1], "data_offsets": [0, 8]}}, bytes(8), r"\[-1\]"),
        ({"g": {"dtype": "F64", "shape": [1], "data_offsets": [0]}}, bytes(8), r"\[0\]"),
        ({"g": [1, 2]}, b"", "'g' is not"),
        ({"__metadata__": {"__meta__": 5}}, b"", "not an object of strings"),
        ([1, 2], b"", "header is a JSON list"),
    ],
)
def test_safetensors_header_checked_before_reading(tmp_path, header, data, match):
    pytest.importorskip("safetensors")
    path = _safetensors_file(tmp_path / "s.safetensors", header, data)
    with pytest.raises(
        ValueError, match=r"s\.safetensors is not a readable safetensors .*" + match
    ):
        checkpoint.load_safetensors(path)


def test_safetensors_header_length_is_capped(tmp_path):
    pytest.importorskip("safetensors")
    path = tmp_path / "h.safetensors"
    path.write_bytes((1 << 60).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match=r"header declares 1152921504606846976 bytes; at most"):
        checkpoint.load_safetensors(path)
    path.write_bytes((100).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match="header declares 100 bytes but the file has 10"):
        checkpoint.load_safetensors(path)
    path.write_bytes(b"\x01\x00")
    with pytest.raises(ValueError, match="it has 2 bytes, fewer than the 8-byte"):
        checkpoint.load_safetensors(path)
    checkpoint.save_safetensors(path, {"g": np.ones(1000)})
    with pytest.raises(ValueError, match="declare 8000 bytes; the limit is max_bytes=4000"):
        checkpoint.load_safetensors(path, max_bytes=4000)


# ----------------------------------------------------------------------------- 5. modes
@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.mark.skipif(not POSIX, reason="POSIX permissions")
@pytest.mark.parametrize("name", ["bn.npz", "bn.safetensors"])
def test_new_files_honour_the_umask_and_overwrites_keep_the_mode(tmp_path, umask_022, name):
    if name.endswith(".safetensors"):
        pytest.importorskip("safetensors")
    path = tmp_path / name
    checkpoint.save_state(path, _state())
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    path.chmod(0o640)
    checkpoint.save_state(path, _state())
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    os.umask(0o077)
    checkpoint.save_state(tmp_path / ("private." + name), _state())
    assert stat.S_IMODE((tmp_path / ("private." + name)).stat().st_mode) == 0o600


# ----------------------------------------------------------------------------- 6. temporaries
def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _age(path, seconds):
    then = time.time() - seconds
    os.utime(path, (then, then))


@pytest.mark.skipif(not POSIX, reason="PID check is POSIX-only")
def test_stale_temporaries_of_the_same_path_are_removed(tmp_path):
    path = tmp_path / "bn.npz"
    dead = tmp_path / f".bn.npz.{_dead_pid()}.0123abcd.tmp"
    fresh_dead = tmp_path / f".bn.npz.{_dead_pid()}.4567abcd.tmp"
    live = tmp_path / f".bn.npz.{os.getpid()}.89abcdef.tmp"
    other = tmp_path / f".other.npz.{_dead_pid()}.0123abcd.tmp"
    ancient = tmp_path / f".bn.npz.{os.getpid()}.00000000.tmp"
    for p in (dead, fresh_dead, live, other, ancient):
        p.write_bytes(b"half a checkpoint")
    for p in (dead, live, other):
        _age(p, 2 * _checkpoint_write.STALE_DEAD_WRITER_S)
    _age(ancient, 2 * _checkpoint_write.STALE_ANY_S)
    checkpoint.save_state(path, _state())
    assert not dead.exists() and not ancient.exists()
    assert live.exists() and fresh_dead.exists() and other.exists()
    state, _ = checkpoint.load_state(path)  # opens the exact path, never a temporary
    assert state["num_batches_tracked"] == 7


_KILLED_SAVE = """
import pathlib, sys, time
from batchnorm import _checkpoint_write
def write(fh):
    fh.write(b"partial")
    fh.flush()
    print("writing", flush=True)
    time.sleep(60)
_checkpoint_write.atomic_write(pathlib.Path(sys.argv[1]), write)
"""


@pytest.mark.skipif(not POSIX, reason="SIGKILL")
def test_a_killed_save_leaves_a_temporary_the_next_save_removes(tmp_path, monkeypatch):
    path = tmp_path / "bn.npz"
    checkpoint.save_state(path, _state())
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_SAVE, str(path)], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline() == "writing\n"
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "bn.npz"]
    assert len(leftovers) == 1 and leftovers[0].startswith(f".bn.npz.{proc.pid}.")
    assert checkpoint.load_state(path)[0]["num_batches_tracked"] == 7  # old file intact
    monkeypatch.setattr(_checkpoint_write, "STALE_DEAD_WRITER_S", 0.0)
    checkpoint.save_state(path, _state())
    assert sorted(os.listdir(tmp_path)) == ["bn.npz"]


def test_a_failed_write_leaves_nothing_and_the_old_file_intact(tmp_path):
    path = tmp_path / "bn.npz"
    checkpoint.save_state(path, _state())
    before = path.read_bytes()

    def write(fh):
        fh.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _checkpoint_write.atomic_write(path, write)
    assert os.listdir(tmp_path) == ["bn.npz"] and path.read_bytes() == before


# ----------------------------------------------------------------------------- 7. symlinks
@pytest.mark.skipif(not POSIX, reason="symlinks")
def test_saving_to_a_symlink_writes_through_it(tmp_path):
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "bn.npz"
    checkpoint.save_state(target, {"g": np.zeros(2)})
    target.chmod(0o640)
    link = tmp_path / "latest.npz"
    link.symlink_to(os.path.join("real", "bn.npz"))
    checkpoint.save_state(link, _state())
    assert link.is_symlink() and os.readlink(link) == os.path.join("real", "bn.npz")
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert checkpoint.load_state(target)[0]["num_batches_tracked"] == 7
    assert sorted(os.listdir(tmp_path / "real")) == ["bn.npz"]
    dangling = tmp_path / "new.npz"
    dangling.symlink_to(tmp_path / "real" / "new.npz")
    checkpoint.save_state(dangling, _state())
    assert dangling.is_symlink() and (tmp_path / "real" / "new.npz").is_file()
    loop = tmp_path / "loop.npz"
    loop.symlink_to(loop)
    with pytest.raises((ValueError, OSError), match=r"loop\.npz"):
        checkpoint.save_state(loop, _state())
    assert loop.is_symlink()


# ----------------------------------------------------------------------------- 8. hostile
def test_folders_and_missing_paths_name_the_path(tmp_path):
    with pytest.raises(IsADirectoryError, match=str(tmp_path)):
        checkpoint.save_state(tmp_path, _state())
    with pytest.raises(IsADirectoryError, match="x.npz"):
        (tmp_path / "x.npz").mkdir()
        checkpoint.load_state(tmp_path / "x.npz")
    with pytest.raises(FileNotFoundError, match=r"folder .*nowhere does not exist"):
        checkpoint.save_state(tmp_path / "nowhere" / "bn.npz", _state())
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        checkpoint.load_state(tmp_path / "missing.npz")
    assert os.listdir(tmp_path) == ["x.npz"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a FIFO")
def test_saving_over_a_non_regular_file_is_refused(tmp_path):
    fifo = tmp_path / "pipe.npz"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match=r"pipe\.npz: it exists and is not a regular file"):
        checkpoint.save_state(fifo, _state())
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and os.listdir(tmp_path) == ["pipe.npz"]


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_truncated_files_are_value_errors_naming_the_path(tmp_path, suffix):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    path = tmp_path / ("bn" + suffix)
    checkpoint.save_state(path, _state(), meta={"batchnorm": GOOD_CFG})
    data = path.read_bytes()
    cut = tmp_path / ("cut" + suffix)
    for n in range(0, len(data), 7):
        cut.write_bytes(data[:n])
        with pytest.raises(ValueError, match=r"cut\."):
            checkpoint.load_state(cut)


def test_corrupted_compressed_data_is_a_value_error(tmp_path):
    path = tmp_path / "c.npz"
    np.savez_compressed(path, gamma=np.arange(4000.0))
    data = bytearray(path.read_bytes())
    for i in range(200, 400):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"c\.npz is not a readable npz"):
        checkpoint.load_state(path)


@pytest.mark.parametrize(
    "state, exc, match",
    [
        ({1: np.ones(2)}, TypeError, "state keys must be non-empty str without NUL; got 1"),
        ({"": np.ones(2)}, TypeError, "got ''"),
        ({"a\x00b": np.ones(2)}, TypeError, "without NUL"),
        ({"__meta__": np.ones(2)}, ValueError, "reserved"),
        ({"g": np.array([{"a": 1}])}, TypeError, r"state\['g'\] has dtype object"),
        ({"g": np.array([1j])}, TypeError, "complex128"),
        ({"g": "text"}, TypeError, "<U4"),
        ({"g": 2**70}, TypeError, r"state\['g'\]"),
        ({"g": [[1], [1, 2]]}, TypeError, "not an array"),
        ([("g", 1)], TypeError, "state must be a dict; got list"),
    ],
)
@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_unsavable_states_are_refused_naming_the_path(tmp_path, state, exc, match, suffix):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    with pytest.raises(exc, match=r"bn\..*" + match):
        checkpoint.save_state(tmp_path / ("bn" + suffix), state)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "meta, match", [([1], "meta must be a dict or None"), ({"x": np.float32(1)}, "JSON")]
)
def test_unsavable_meta_is_refused(tmp_path, meta, match):
    with pytest.raises(TypeError, match=match):
        checkpoint.save_state(tmp_path / "bn.npz", _state(), meta=meta)


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert type(a[k]) is type(b[k]), k
        if isinstance(a[k], np.ndarray):
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
            np.testing.assert_array_equal(a[k], b[k])
        else:
            assert a[k] == b[k]


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_loaded_states_round_trip_exactly(tmp_path, suffix):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    state = {
        "h": np.array([1.5, -2.0], dtype=np.float16),
        "f": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        "b": np.array([True, False]),
        "u": np.array(2**64 - 1, dtype=np.uint64),
        "i8": np.array(-3, dtype=np.int8),
        "n": 12,
        "e": np.zeros((0, 3), dtype=np.float32),
        "file": np.ones(1),  # np.savez's own argument names must not capture state keys
        "allow_pickle": np.zeros(1),
    }
    if suffix == ".npz":
        state["be"] = np.array([1.0, 2.0], dtype=">f8")
    first, _ = checkpoint.load_state(checkpoint.save_state(tmp_path / ("a" + suffix), state))
    assert first["n"] == 12 and type(first["n"]) is int
    assert first["i8"].shape == () and first["i8"].dtype == np.int8
    _same(first, {k: (v if isinstance(v, int) else np.asarray(v)) for k, v in state.items()})
    second, _ = checkpoint.load_state(checkpoint.save_state(tmp_path / ("b" + suffix), first))
    _same(second, first)


def test_layer_checkpoint_still_round_trips(rng, tmp_path):
    layer = bn.BatchNorm(3, convention="torch")
    layer(rng.standard_normal((6, 3)))
    layer.save(tmp_path / "bn.npz")
    state, meta = checkpoint.load_state(tmp_path / "bn.npz")
    cfg = checkpoint.layer_config(meta, tmp_path / "bn.npz", state)
    assert cfg == layer.config() and state["num_batches_tracked"] == 1


def test_loading_a_fifo_is_refused_without_blocking(tmp_path):
    import os
    import subprocess
    import sys

    fifo = tmp_path / "layer.npz"
    os.mkfifo(fifo)
    code = (
        "import sys, batchnorm as bn\n"
        "try:\n    bn.BatchNorm(3).load(sys.argv[1])\n"
        "except ValueError as e:\n    print('refused:', e)\n"
    )
    for path in (fifo, fifo.with_suffix(".safetensors")):
        if not path.exists():
            os.mkfifo(path)
        res = subprocess.run(
            [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60
        )
        assert "refused:" in res.stdout and "not a regular file" in res.stdout, res.stderr
