"""The workdir: which paths a run may use, how files reach a remote one, and who owns it.

A workdir is a local directory or a ``gs://`` URI. Checkpoints go through orbax, whose TensorStore
driver writes ``gs://`` natively; every other file (``config.json``, metrics, TensorBoard events,
exports, plots, sweeps) goes through ``etils.epath``. Object stores can neither append nor rename
in place, so those files are written locally first and copied up whole (:func:`local_file`,
:func:`local_dir`); for a local workdir the same helpers hand back the real path, so local runs
write exactly where and how they always did.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import tempfile
from typing import Iterator

from etils import epath

# URI schemes that both orbax (TensorStore) and etils.epath can write. s3:// is left out: epath
# reaches it only through s3fs, which saitjax does not install.
REMOTE_SCHEMES = ("gs",)


class WorkdirError(ValueError):
    """A workdir this run cannot use; raised before anything is written to it."""


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
    """Refuse a local workdir that is a file, sits under a file, or cannot be written.

    Checks without writing anything; a remote workdir is checked by its first write instead.
    """
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


def check_exists(path: str, what: str) -> None:
    """``--mode eval/sweep`` read a workdir: a missing one is an error, never created."""
    if not epath.Path(path).is_dir():
        raise WorkdirError(f"workdir {path} does not exist: nothing to {what}. Train in it first "
                           "(without --mode), or check the path")


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
