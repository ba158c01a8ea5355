"""Orbax checkpoints of the training state, restorable onto another device count.

``workdir/checkpoints/<step>/`` holds two items: ``state`` (params, optimizer state, step; saved
with ``StandardSave``) and ``meta`` (JSON: model name, method, config digest, saitjax version).
Saves are asynchronous and atomic (orbax writes to a temporary directory and renames), and at
most ``max_to_keep`` are kept. Restoring uses abstract arrays carrying the shardings of the
*current* mesh, so a run saved on 8 devices resumes on 1 (or on a pod).
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import struct

from saitjax import workdir


class TrainState(struct.PyTreeNode):
    """Everything a training step changes. RNGs are derived from (seed, step), not stored.

    ``model_state``: non-parameter collections the model updates in training (BatchNorm's
    ``batch_stats``); empty for most models, and then absent from the checkpoint, so checkpoints
    of parameter-only models keep the layout they always had.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    model_state: Any = struct.field(default_factory=dict)

    def variables(self) -> dict[str, Any]:
        """What ``model.apply`` takes: ``{"params": ..., **model_state}``."""
        return {"params": self.params, **self.model_state}


def _as_tree(state: TrainState) -> dict[str, Any]:
    tree = {"step": state.step, "params": state.params, "opt_state": state.opt_state}
    if state.model_state:
        tree["model_state"] = state.model_state
    return tree


def _from_tree(tree: dict[str, Any]) -> TrainState:
    return TrainState(step=tree["step"], params=tree["params"], opt_state=tree["opt_state"],
                      model_state=tree.get("model_state", {}))


class CheckpointMismatchError(RuntimeError):
    """The workdir holds checkpoints of a different model/method than the one asked for."""


class CheckpointCorruptError(RuntimeError):
    """No checkpoint of the workdir can be read."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (disk full, quota, permissions): the run stops there; the
    checkpoints written before are complete (orbax renames a save into place only when it is done)."""


def _errno_of(err: BaseException) -> int | None:
    """The ``errno`` of the first ``OSError`` in ``err``'s chain (orbax and TensorStore wrap them)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno:
            return err.errno
        err = err.__cause__ or err.__context__
    return None


def _quiet_abandoned_reads(previous: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """An ``sys.unraisablehook`` that drops what a failed orbax restore leaves behind and passes
    everything else on. When one array of a damaged checkpoint cannot be read, orbax abandons the
    other reads; each reports an "Exception ignored" with its TensorStore spec, or an "Event loop
    is closed" from a thread: thousands of lines that say nothing the warning does not."""
    if getattr(previous, "saitjax_quiet_reads", False):
        return previous

    def hook(unraisable: Any) -> None:
        exc, obj = unraisable.exc_value, unraisable.object
        if getattr(obj, "__name__", "") == "_read_array_index_and_device_put" or (
                isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"):
            return
        previous(unraisable)

    hook.saitjax_quiet_reads = True
    return hook


class _AbandonedReadLogFilter(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" for the reads orbax abandons when a
    damaged checkpoint fails (the same leftovers :func:`_quiet_abandoned_reads` silences)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "_read_array_index_and_device_put" not in record.getMessage()


_ASYNCIO_FILTER = _AbandonedReadLogFilter()


def _brief(err: BaseException) -> str:
    """The first line of an error (orbax/TensorStore errors run to many lines), type included."""
    lines = str(err).strip().splitlines() or [""]
    first = lines[0].split(" See full TensorStore details")[0]  # the rest is a repr of its spec
    text = first[:300] + (" ..." if len(lines) > 1 or len(first) < len(lines[0]) or len(first) > 300 else "")
    return f"{type(err).__name__}: {text}"


class Checkpointer:
    """A thin, explicit wrapper over ``ocp.CheckpointManager``."""

    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True,
                 create: bool = True):
        # A gs:// URI goes to orbax as it is (TensorStore writes it); abspath would make it local.
        self.directory = directory if workdir.is_remote(directory) else os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create,
                                               enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "meta"))
        self._pending: int | None = None  # the step whose (asynchronous) save may still fail
        self._failed = False

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def reload(self) -> int | None:
        """Re-read the directory (another process may have saved since); the latest step."""
        self._manager.reload()
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: TrainState, meta: dict[str, Any], *, force: bool = True) -> bool:
        """Start an (asynchronous) save of ``state`` at ``step``; ``wait()`` to block on it.

        A failed write -- this one, or the previous asynchronous one, which orbax reports here --
        raises :class:`CheckpointSaveError` naming its step, once."""
        try:
            saved = self._manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(_as_tree(state)), meta=ocp.args.JsonSave(meta)), force=force)
        except Exception as err:  # noqa: BLE001 - any way a write can fail
            failed = self._pending if self._pending is not None and not self._is_complete(self._pending) else step
            raise self._save_error(failed, err) from None
        if saved:
            self._pending = step
            logging.info("checkpoint: saving step %d to %s", step, self.directory)
        return saved

    def _is_complete(self, step: int) -> bool:
        try:
            return step in self._manager.all_steps()
        except Exception:  # noqa: BLE001
            return False

    def _save_error(self, step: int, err: BaseException) -> CheckpointSaveError:
        self._failed = True
        try:
            done = [s for s in self._manager.all_steps() if s != step]
        except Exception:  # noqa: BLE001 - the directory itself may be unreadable now
            done = []
        kept = (f"the newest complete checkpoint is step {max(done)}" if done else "no complete checkpoint exists yet")
        code = _errno_of(err)
        if code in (errno.ENOSPC, errno.EDQUOT):
            why = "the disk is full (or over quota): free space or point --workdir elsewhere"
        elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
            why = "the workdir is not writable: fix its permissions or point --workdir elsewhere"
        else:
            why = "fix the cause"
        return CheckpointSaveError(f"checkpoint of step {step} could not be written to {self.directory} "
                                   f"({_brief(err)}); {why}, then run the same command to resume ({kept})")

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        step = self.latest_step() if step is None else step
        if step is None:
            return {}
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"] or {})

    def newest_meta(self) -> tuple[int | None, dict[str, Any]]:
        """``(step, meta)`` of the newest checkpoint whose metadata reads (unreadable ones are
        named in a warning and skipped); ``(None, {})`` when there is none."""
        for step in sorted(self.all_steps(), reverse=True):
            try:
                return step, self.read_meta(step)
            except Exception as err:  # noqa: BLE001 - any way a file can be damaged
                logging.warning("checkpoint at step %d in %s is unreadable: %s", step, self.directory, _brief(err))
        return None, {}

    def restore(self, abstract_state: TrainState, step: int | None = None) -> tuple[TrainState, dict, int]:
        """The newest intact checkpoint at or before ``step`` (default: the latest), onto the
        shardings carried by ``abstract_state`` (see :func:`abstract_like`): ``(state, meta, step)``.

        A damaged checkpoint (truncated file, garbled metadata) is named in a warning and the one
        before it is tried; only when none can be read is it an error.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        unreadable = []
        previous_hook = sys.unraisablehook
        sys.unraisablehook = _quiet_abandoned_reads(previous_hook)
        logging.getLogger("asyncio").addFilter(_ASYNCIO_FILTER)  # idempotent; the filter is that narrow
        for candidate in sorted((s for s in self.all_steps() if s <= step), reverse=True):
            try:
                restored = self._manager.restore(candidate, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(_as_tree(abstract_state)), meta=ocp.args.JsonRestore()))
            except Exception as err:  # noqa: BLE001 - any way a file can be damaged
                logging.warning("checkpoint at step %d in %s is unreadable: %s", candidate, self.directory,
                                _brief(err))
                unreadable.append(candidate)
                continue
            if unreadable:  # the filter stays: reads abandoned by orbax may still report
                logging.warning("falling back to step %d, the newest intact checkpoint (unreadable: steps %s)",
                                candidate, ", ".join(map(str, unreadable)))
            else:
                sys.unraisablehook = previous_hook
            return _from_tree(restored["state"]), dict(restored["meta"] or {}), candidate
        raise CheckpointCorruptError(
            f"no checkpoint in {self.directory} can be read (steps {', '.join(map(str, unreadable))} are "
            "damaged); move them away to start afresh, or use another --workdir")

    def set_aside(self, step: int, directory: str) -> str:
        """Move the (damaged) checkpoint of ``step`` into ``directory``, out of the way of the save
        that will be made at that step again; nothing is deleted. Returns where it went."""
        target = epath.Path(directory) / str(step)
        n = 1
        while target.exists():
            target, n = epath.Path(directory) / f"{step}.{n}", n + 1
        target.parent.mkdir(parents=True, exist_ok=True)
        (epath.Path(self.directory) / str(step)).rename(target)
        self._manager.reload()
        return str(target)

    def wait(self) -> None:
        """Block until the pending save is on disk (:class:`CheckpointSaveError` if it failed)."""
        try:
            self._manager.wait_until_finished()
        except Exception as err:  # noqa: BLE001 - any way a write can fail
            if self._failed:  # reported already
                return
            raise self._save_error(self._pending if self._pending is not None else -1, err) from None

    def close(self) -> None:
        """Finish pending writes and release the manager; a failure already reported is not raised again."""
        try:
            self.wait()
        finally:
            try:
                self._manager.close()
            except Exception:  # noqa: BLE001 - closing after a failed write must not hide that failure
                if not self._failed:
                    raise


def abstract_like(tree: Any, sharding: jax.sharding.Sharding | Any) -> Any:
    """``ShapeDtypeStruct``s of ``tree`` (arrays or eval_shape output) placed with ``sharding``
    (one for all, or a tree of shardings like ``tree``): what a restore lays the arrays out as,
    whatever layout they were saved from."""
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sharding)


def check_meta_compatible(saved: dict[str, Any], wanted: dict[str, Any], directory: str) -> None:
    """Refuse to resume a checkpoint of another model or method (and never overwrite it)."""
    problems = [f"{key}: checkpoint has {saved.get(key)!r}, the config asks for {wanted.get(key)!r}"
                for key in ("model", "method", "num_classes", "img_size")
                if key in saved and key in wanted and saved[key] != wanted[key]]
    if problems:
        raise CheckpointMismatchError(
            f"{directory} holds checkpoints of another run ({'; '.join(problems)}). Nothing was "
            "changed. Use a fresh --workdir, or point config.init at this run's exported params "
            "to fine-tune from it.")
