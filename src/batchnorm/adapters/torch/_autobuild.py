"""The native node's background build (:mod:`.native`): by default, the first call of a
process that could take the native route, where the extension is not built yet, starts one
detached build and goes on with the Python route; later calls pick the extension up once
the build is done.

* One build at a time across processes (say 8 ranks starting together): the builder holds
  an exclusive lock file (:data:`LOCK`, made with ``O_CREAT | O_EXCL``) in the cache
  directory, with its pid, host and start time. A lock older than :data:`STALE_S` seconds,
  or whose process is gone (same host), is stale and may be taken over. Processes that find
  a live lock wait for that build (quietly) instead of starting their own.
* The build is ``sys.executable`` running :func:`main` (:func:`command`): a new session,
  lowered priority (``os.nice``), stdout and stderr to :data:`LOG` in the cache directory;
  it compiles the extension without ninja (written to a temporary file, then renamed, so
  that a build killed midway never leaves a half-written library) and the kernels' entry
  points, then releases the lock.
* A failed build writes :data:`FAILED` (the error, where the log is); later processes of the
  same torch, Python and source (the cache directory is keyed by them) do not retry it and
  print one line. ``batchnorm warmup --torch`` and :func:`.native.build` build in the
  foreground as before and remove the marker when they succeed.
* :meth:`Watcher.poll` costs one ``time.monotonic()`` comparison per call; it looks at the
  files at most every :data:`CHECK_S` seconds and never waits.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

__all__ = ["CHECK_S", "FAILED", "LOCK", "LOG", "STALE_S", "Watcher", "command", "main"]

LOCK, FAILED, LOG = "build.lock", "build.failed", "build.log"
#: A lock this old (seconds since it was written) is stale whatever its process does.
STALE_S = 15 * 60
#: Seconds between two looks at the cache directory while a build runs.
CHECK_S = 2.0
#: The build's ``os.nice`` increment.
NICE = 10
#: Poll answers: load the built extension now; the Python route for now; for good.
READY, WAIT, OFF = "ready", "wait", "off"
#: Signals after which the build counts as stopped (a later process retries), not failed.
_STOPPED = {int(signal.SIGKILL), int(signal.SIGTERM), int(signal.SIGINT), int(signal.SIGHUP)}
_HOST = socket.gethostname()
_OFF_HINT = "BATCHNORM_TORCH_NATIVE=0 turns the native node off"


def command(token: str) -> list[str]:
    """The background build's command line: this Python running :func:`main`."""
    code = f"from batchnorm.adapters.torch._autobuild import main; main({token!r})"
    return [sys.executable, "-c", code]


def _say(text: str) -> None:
    print(f"batchnorm: {text}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the lock
def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host runs (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OSError, OverflowError):
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def _read(path: Path) -> tuple[dict | None, float] | None:
    """A lock's record (None while it is being written) and age; None where it is gone."""
    try:
        age = time.time() - path.stat().st_mtime
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        info = json.loads(text)
    except ValueError:
        info = None
    return (info if isinstance(info, dict) else None), age


def stale(path: Path) -> bool:
    """Whether the lock at ``path`` is gone or stale (too old, or its process is gone)."""
    got = _read(path)
    if got is None:
        return True
    info, age = got
    if age > STALE_S:
        return True
    if info is None or info.get("host") != _HOST or not isinstance(info.get("pid"), int):
        return False  # being written, or another host's: judged by its age only
    return not _pid_alive(info["pid"])


def held(where: Path) -> bool:
    """Whether a live build holds the lock of ``where``."""
    return not stale(where / LOCK)


def _write(path: Path, text: str) -> None:
    """``text`` into ``path`` atomically (a temporary file, then renamed)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _record(pid: int, token: str) -> str:
    return json.dumps({"pid": pid, "host": _HOST, "time": time.time(), "token": token})


def _take_over(path: Path) -> bool:
    """Move a stale lock aside (True: the lock may be taken now)."""
    if not stale(path):
        return False
    aside = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.stale")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return True
    if not stale(aside):  # another process's new lock, made meanwhile: put it back
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
        os.unlink(aside)
        return False
    os.unlink(aside)
    return True


def acquire(where: Path, token: str) -> bool:
    """Take the build lock of ``where`` (True) or find it held by a live build (False).
    Raises OSError where the directory cannot be made or written."""
    where.mkdir(parents=True, exist_ok=True)
    path = where / LOCK
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if not _take_over(path):
                return False
            continue
        with os.fdopen(fd, "w") as f:
            f.write(_record(os.getpid(), token))
        return True
    return False


def release(where: Path, token: str) -> None:
    """Remove the lock of ``where`` if it is still the one taken with ``token``."""
    got = _read(where / LOCK)
    if got is not None and got[0] is not None and got[0].get("token") == token:
        (where / LOCK).unlink(missing_ok=True)


def clear_failure(where: Path) -> None:
    """Remove the failure marker of ``where`` (a foreground build succeeded)."""
    try:
        (where / FAILED).unlink(missing_ok=True)
    except OSError:
        pass


def _fail(where: Path, why: str) -> None:
    """Write the failure marker: ``why`` and the log's last lines."""
    try:
        log = (where / LOG).read_text(errors="replace")[-4000:]
    except OSError:
        log = ""
    _write(where / FAILED, f"{why}\nlog: {where / LOG}\n{log}")


# --------------------------------------------------------------------------- the build
def main(token: str) -> None:
    """The background build (run by :func:`command`): build the extension without ninja
    and compile the common entry points; a failure writes the marker; the lock goes."""
    try:
        os.nice(NICE)
    except OSError:
        pass
    from . import native

    where = native.cache_dir()
    try:
        native.build(use_ninja=False)
        native.prepare_eval()
    except Exception as exc:
        if not native.built():
            _fail(where, f"{type(exc).__name__}: {exc!s:.4000}")
        raise
    finally:
        release(where, token)


# --------------------------------------------------------------------------- the caller
class Watcher:
    """What the default route asks on each call (:meth:`poll`) until the extension is
    loaded: ``built()`` says whether it is in ``where()`` (:func:`.native.built`,
    :func:`.native.cache_dir`)."""

    def __init__(self, built, where):
        self._built, self._where = built, where
        self.due = 0.0  # the time.monotonic() of the next look at the files
        self._mutex = threading.Lock()
        self._proc = None  # the build this process started, while it runs
        self._owner = 0  # the pid of the process that started it
        self._token = ""
        self._tried = False  # whether this process started (or tried to start) a build

    def poll(self) -> str:
        """:data:`READY` (load the extension now), :data:`WAIT` (the Python route for now)
        or :data:`OFF` (for good in this process). Never waits."""
        if time.monotonic() < self.due or not self._mutex.acquire(blocking=False):
            return WAIT
        try:
            state = self._look()
        except OSError as exc:  # (an unreadable cache directory): the caller goes on
            _say(f"the native torch node's cache cannot be read ({exc}); the Python route serves")
            state = OFF
        finally:
            self.due = time.monotonic() + CHECK_S
            self._mutex.release()
        return state

    def _look(self) -> str:
        where = self._where()
        if self._proc is not None and self._owner == os.getpid():
            code = self._proc.poll()
            if code is None:
                return WAIT
            self._proc = None
            release(where, self._token)
            return READY if self._built() else self._ended(where, code)
        if self._proc is not None:  # a forked child's copy: not its build, but it may wait
            self._proc, self._tried = None, False
        if self._built():
            return WAIT if held(where) else READY
        if (where / FAILED).exists():
            _say(
                f"the native torch node could not be built earlier (see {where / FAILED}); "
                f"the Python route serves ('batchnorm warmup --torch' retries; {_OFF_HINT})"
            )
            return OFF
        if self._tried or getattr(sys, "frozen", False) or not sys.executable:
            return OFF
        return self._start(where)

    def _start(self, where: Path) -> str:
        """Take the lock and start the build; WAIT for another process's build."""
        self._tried, token = True, secrets.token_hex(8)
        try:
            if not acquire(where, token):
                self._tried = False  # (that build may be stopped: this process may retry)
                return WAIT
            proc = None
            try:
                with open(where / LOG, "w") as log:
                    proc = subprocess.Popen(
                        command(token),
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                        env=_child_env(),
                    )
                _write(where / LOCK, _record(proc.pid, token))  # the builder's pid
            except BaseException:
                if proc is not None:  # (the lock could not be given to it: no build)
                    proc.kill()
                    proc.wait()
                release(where, token)
                raise
        except Exception as exc:  # noqa: BLE001 - whatever it is, the caller goes on
            _say(
                f"the native torch node cannot be built in the background ({exc}); the "
                f"Python route serves ({_OFF_HINT})"
            )
            return OFF
        self._proc, self._owner, self._token = proc, os.getpid(), token
        _say(
            f"building the native torch node in the background, once (about 30-60 s; "
            f"log: {where / LOG}); the Python route serves until it is ready ({_OFF_HINT})"
        )
        return WAIT

    def _ended(self, where: Path, code: int) -> str:
        """The build this process started ended without the extension: say why, once."""
        if -code in _STOPPED and not (where / FAILED).exists():
            _say(
                f"the native torch node's background build was stopped (signal {-code}; "
                f"log: {where / LOG}); the Python route serves, a later process retries"
            )
            return OFF
        if not (where / FAILED).exists():
            try:
                _fail(where, f"the build exited with status {code}")
            except OSError:
                pass
        _say(
            f"the native torch node could not be built (see {where / FAILED}); the Python "
            f"route serves ('batchnorm warmup --torch' retries; {_OFF_HINT})"
        )
        return OFF


def _child_env() -> dict:
    """The build's environment: this one, with this copy of the library first on the path
    and the native route off (the build loads the extension itself)."""
    src = str(Path(__file__).resolve().parents[3])
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": src if not path else src + os.pathsep + path}
    env["BATCHNORM_TORCH_NATIVE"] = "0"
    return env
