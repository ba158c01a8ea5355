"""Checkpointer: a write that fails (disk full, read-only) is reported once, naming its step and
the newest complete checkpoint, and the checkpoints written before stay readable."""

from __future__ import annotations

import errno

import jax.numpy as jnp
import numpy as np
import pytest

from saitjax.checkpointing import Checkpointer, CheckpointSaveError, TrainState


def _state(value: float) -> TrainState:
    return TrainState(step=jnp.asarray(int(value)), params={"w": jnp.full((3,), value)}, opt_state={})


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_save_names_its_step_once_and_keeps_the_earlier_checkpoints(tmp_path, monkeypatch):
    ckpt = Checkpointer(str(tmp_path / "ckpt"), async_save=True)
    ckpt.save(1, _state(1.0), {"model": "m"})
    ckpt.wait()
    monkeypatch.setattr(ckpt._manager, "save", _disk_full)
    with pytest.raises(CheckpointSaveError, match=r"checkpoint of step 2 could not be written to .*ckpt "
                       r"\(OSError: .*No space left on device\); the disk is full .* free space or point "
                       r"--workdir elsewhere, then run the same command to resume \(the newest complete "
                       r"checkpoint is step 1\)"):
        ckpt.save(2, _state(2.0), {"model": "m"})
    ckpt.close()  # reported already: closing does not raise it again
    again = Checkpointer(str(tmp_path / "ckpt"))
    assert again.all_steps() == [1]
    restored, meta, step = again.restore(_state(0.0))
    assert step == 1 and meta == {"model": "m"}
    np.testing.assert_array_equal(restored.params["w"], np.ones(3))
    again.close()


def test_an_asynchronous_failure_is_reported_at_the_step_that_failed(tmp_path, monkeypatch):
    ckpt = Checkpointer(str(tmp_path / "ckpt"), async_save=True)
    ckpt.save(3, _state(3.0), {"model": "m"})

    def fails(*args, **kwargs):
        raise RuntimeError("write failed") from OSError(errno.EROFS, "Read-only file system")

    ckpt.wait()
    monkeypatch.setattr(ckpt._manager, "wait_until_finished", fails)
    ckpt._pending = 4  # as if step 4's save had started and its background write then failed
    with pytest.raises(CheckpointSaveError, match=r"checkpoint of step 4 .*RuntimeError: write failed.*"
                       r"not writable.*newest complete checkpoint is step 3"):
        ckpt.wait()
    ckpt.wait()  # once
    monkeypatch.undo()
    ckpt.close()
