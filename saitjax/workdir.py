"""The workdir: which paths a run may use, how files reach a remote one, and who owns it.

A workdir is a local directory or a ``gs://`` URI. Checkpoints go through orbax, whose TensorStore
driver writes ``gs://`` natively; every other file (``config.json``, metrics, TensorBoard events,
exports, plots, sweeps) goes through ``etils.epath``. Object stores can neither append nor rename
in place, so those files are written locally first and copied up whole (:func:`local_file`,
:func:`local_dir`); for a local workdir the same helpers hand back the real path, so local runs
write exactly where and how they always did.

A workdir belongs to one training run at a time (:class:`WorkdirLock`): a second run on it would
"resume" from the live one and overwrite its checkpoints with different training.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import os
import posixpath
import socket
import tempfile
import threading
import time
from typing import Any, Iterator

from etils import epath

# URI schemes that both orbax (TensorStore) and etils.epath can write. s3:// is left out: epath
# reaches it only through s3fs, which saitjax does not install.
REMOTE_SCHEMES = ("gs",)
LOCK_FILE = "LOCK"


class WorkdirError(ValueError):
    """A workdir this run cannot use; raised before anything is written to it."""


class WorkdirBusyError(RuntimeError):
    """Another live run owns the workdir."""


def scheme(path: str) -> str | None:
    """``"gs"`` for ``gs://bucket/dir``, ``None`` for a local path."""
    head, sep, _ = str(path).partition("://")
    return head if sep and "/" not in head else None


def is_remote(path: str) -> bool:
    return scheme(path) is not None


def resolve(text: str | os.PathLike | None) -> str:
    """The workdir as every module will see it: an absolute local path, or the URI untouched.

    ``os.path.abspath("gs://b/x")`` is ``$PWD/gs:/b/x``: a remote URI must never reach it.
    """
    text = "" if text is None else os.fspath(text).strip()
    if not text:
        raise WorkdirError("--workdir is empty: give a directory (local, or gs://bucket/dir)")
    found = scheme(text)
    if found is None:
        return os.path.abspath(os.path.expanduser(text))
    if found not in REMOTE_SCHEMES:
        raise WorkdirError(f"workdir {text!r}: the scheme {found}:// is not supported; use a local "
                           f"directory or one of {', '.join(s + '://' for s in REMOTE_SCHEMES)}")
    if not text[len(found) + 3:].strip("/"):
        raise WorkdirError(f"workdir {text!r} names no bucket: use {found}://BUCKET/DIR")
    return text.rstrip("/")


def join(path: str, *parts: str) -> str:
    """``os.path.join`` for local paths, ``/``-joined for URIs."""
    return posixpath.join(path, *parts) if is_remote(path) else os.path.join(path, *parts)


def check_writable(path: str) -> None:
    """Refuse a local workdir that is a file, sits under a file, or cannot be written, before
    the run loads data or writes anything; a remote workdir is checked by its first write."""
    if is_remote(path):
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise WorkdirError(f"workdir {path} is a file, not a directory; choose another --workdir")
    existing = path
    while not os.path.exists(existing):
        parent = os.path.dirname(existing)
        if parent == existing:
            break
        existing = parent
    if not os.path.isdir(existing):
        raise WorkdirError(f"workdir {path} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise WorkdirError(f"workdir {path} is not writable ({existing} is read-only for this user)")
    try:  # root passes os.access everywhere; a nameless temporary file tells, and leaves no trace
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise WorkdirError(f"workdir {path} is not writable ({existing}: {err.strerror})") from None


def makedirs(path: str) -> None:
    """Create ``path`` (and parents); a file in the way or a read-only disk is a WorkdirError."""
    try:
        epath.Path(path).mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as err:
        raise WorkdirError(f"cannot create {path}: a file is in the way ({err})") from None
    except OSError as err:
        if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise WorkdirError(f"cannot write to {path}: {err.strerror}") from None
        raise


def upload(local: str, target: str) -> None:
    """Copy the local file ``local`` to ``target`` (a remote path), replacing what is there."""
    epath.Path(target).parent.mkdir(parents=True, exist_ok=True)
    epath.Path(local).copy(target, overwrite=True)


@contextlib.contextmanager
def local_file(target: str) -> Iterator[str]:
    """A local path through which to write ``target``: ``target`` itself when it is local; for a
    remote ``target`` a temporary file, copied up whole when the block succeeds."""
    if not is_remote(target):
        yield target
        return
    with tempfile.TemporaryDirectory(prefix="saitjax_stage_") as tmp:
        local = os.path.join(tmp, posixpath.basename(target))
        yield local
        if os.path.exists(local):
            upload(local, target)


@contextlib.contextmanager
def local_dir(target: str) -> Iterator[str]:
    """:func:`local_file` for a directory of outputs (e.g. a density sweep)."""
    if not is_remote(target):
        yield target
        return
    with tempfile.TemporaryDirectory(prefix="saitjax_stage_") as tmp:
        yield tmp
        for root, _, files in os.walk(tmp):
            for name in files:
                local = os.path.join(root, name)
                upload(local, posixpath.join(target, *os.path.relpath(local, tmp).split(os.sep)))


# ----------------------------------------------------------------------------------------------
# One run per workdir
# ----------------------------------------------------------------------------------------------


def _owner_text(owner: dict[str, Any]) -> str:
    return (f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')} "
            f"(since {owner.get('since', '?')})")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


class WorkdirLock:
    """Exclusive ownership of a workdir by one training process (the chief of a multi-host run).

    Local: ``fcntl.flock`` on ``workdir/LOCK``. The kernel drops it when the process dies,
    however it dies, so a SIGKILLed run never blocks its own resume. Remote (``gs://``, no
    flock): a lease file renewed every ``renew_s`` by a daemon thread; a lease not renewed for
    ``expire_s``, or held by a dead process on this host, is stale and is taken over.
    Either way the file names its owner (host, pid, start time) for the refusal message.
    """

    def __init__(self, workdir: str, *, lease: bool | None = None, renew_s: float = 60.0,
                 expire_s: float = 600.0):
        self.workdir = workdir
        self.path = join(workdir, LOCK_FILE)
        self.lease = is_remote(workdir) if lease is None else lease
        self.renew_s, self.expire_s = renew_s, expire_s
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(),
                      "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        self._fd: int | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _busy(self, owner: dict[str, Any]) -> WorkdirBusyError:
        how = (f"its lease expires {self.expire_s:.0f} s after its last renewal" if self.lease
               else "the lock goes with the process")
        return WorkdirBusyError(
            f"workdir {self.workdir} is in use by another run: {_owner_text(owner)}. Two runs in one "
            f"workdir would overwrite each other's checkpoints; nothing was changed. Wait for that run "
            f"to finish, stop it, or use another --workdir (if that process is gone, {how}).")

    def _note_previous(self, previous: dict[str, Any]) -> None:
        if previous and not previous.get("released", False):
            logging.warning("workdir %s: the previous run (%s) ended without releasing it (killed?); "
                            "taking it over", self.workdir, _owner_text(previous))

    def acquire(self) -> "WorkdirLock":
        """Own the workdir (creating it) or raise :class:`WorkdirBusyError` naming the owner."""
        makedirs(self.workdir)
        if self.lease:
            self._acquire_lease()
        else:
            self._acquire_flock()
        return self

    def _acquire_flock(self) -> None:
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise WorkdirError(f"cannot write to workdir {self.workdir}: {err.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _parse(os.pread(fd, 4096, 0))
            os.close(fd)
            raise self._busy(owner) from None
        self._note_previous(_parse(os.pread(fd, 4096, 0)))
        self._fd = fd
        self._write_fd(self.owner)

    def _write_fd(self, owner: dict[str, Any]) -> None:
        data = (json.dumps(owner) + "\n").encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def _read_lease(self) -> dict[str, Any]:
        try:
            return _parse(epath.Path(self.path).read_bytes())
        except FileNotFoundError:
            return {}

    def _lease_live(self, owner: dict[str, Any]) -> bool:
        if not owner or owner.get("released", False):
            return False
        if owner.get("host") == self.owner["host"] and isinstance(owner.get("pid"), int):
            if not _pid_alive(owner["pid"]):
                return False
        return time.time() - float(owner.get("renewed", 0)) < self.expire_s

    def _write_lease(self, **extra: Any) -> None:
        epath.Path(self.path).write_text(json.dumps({**self.owner, "renewed": time.time(), **extra}) + "\n")

    def _acquire_lease(self) -> None:
        previous = self._read_lease()
        if self._lease_live(previous):
            raise self._busy(previous)
        self._write_lease()
        time.sleep(min(1.0, self.renew_s / 10))  # two runs starting together: the last writer wins
        now = self._read_lease()
        if (now.get("host"), now.get("pid"), now.get("since")) != tuple(
                self.owner[k] for k in ("host", "pid", "since")):
            raise self._busy(now)
        self._note_previous(previous)
        self._renewer = threading.Thread(target=self._renew, name="saitjax-workdir-lease", daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.renew_s):
            try:
                self._write_lease()
            except Exception as err:  # a transient store error must not kill training
                logging.warning("workdir %s: could not renew the lease: %s", self.workdir, err)

    def release(self) -> None:
        """Give the workdir up (marked released, so the next owner knows this run ended cleanly)."""
        if self._fd is not None:
            import fcntl

            self._write_fd({**self.owner, "released": True})
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        if self._renewer is not None:
            self._stop.set()
            self._renewer.join()
            self._renewer = None
            self._write_lease(released=True)


def _parse(data: bytes) -> dict[str, Any]:
    try:
        owner = json.loads(data.decode("utf-8", "replace") or "{}")
    except json.JSONDecodeError:
        return {}
    return owner if isinstance(owner, dict) else {}
