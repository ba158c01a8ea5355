"""Orbax checkpoints of the training state, restorable onto another device count.

``workdir/checkpoints/<step>/`` holds two items: ``state`` (params, optimizer state, step; saved
with ``StandardSave``) and ``meta`` (JSON: model name, method, config digest, saitjax version).
Saves are asynchronous and atomic (orbax writes to a temporary directory and renames), and at
most ``max_to_keep`` are kept. Restoring uses abstract arrays carrying the shardings of the
*current* mesh, so a run saved on 8 devices resumes on 1 (or on a pod).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import struct

from saitjax import workdir


class TrainState(struct.PyTreeNode):
    """Everything a training step changes. RNGs are derived from (seed, step), not stored."""

    step: jax.Array
    params: Any
    opt_state: Any


class CheckpointMismatchError(RuntimeError):
    """The workdir holds checkpoints of a different model/method than the one asked for."""


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

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def reload(self) -> int | None:
        """Re-read the directory (another process may have saved since); the latest step."""
        self._manager.reload()
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: TrainState, meta: dict[str, Any], *, force: bool = True) -> bool:
        """Start an (asynchronous) save of ``state`` at ``step``; ``wait()`` to block on it."""
        saved = self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)
        if saved:
            logging.info("checkpoint: saving step %d to %s", step, self.directory)
        return saved

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        step = self.latest_step() if step is None else step
        if step is None:
            return {}
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"] or {})

    def restore(self, abstract_state: TrainState, step: int | None = None) -> tuple[TrainState, dict]:
        """Restore onto the shardings carried by ``abstract_state`` (see :func:`abstract_like`)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return restored["state"], dict(restored["meta"] or {})

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(tree: Any, sharding: jax.sharding.Sharding) -> Any:
    """``ShapeDtypeStruct``s of ``tree`` (arrays or eval_shape output) placed with ``sharding``."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


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
