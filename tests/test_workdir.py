"""Workdirs: local and gs:// paths, bad ones refused before anything is written, one run each."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest

import jax
from etils import epath
from etils.epath import testing as epath_testing

from saitjax import checkpointing, parallel, train, workdir
from saitjax.metrics import MetricWriter, read_metrics

from train_fixtures import fast_compile, tiny_config, tiny_data


def test_resolve_keeps_uris_and_makes_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert workdir.resolve("gs://bucket/runs/a/") == "gs://bucket/runs/a"
    assert workdir.resolve("runs/a") == str(tmp_path / "runs" / "a")
    assert workdir.join("gs://bucket/a", "checkpoints") == "gs://bucket/a/checkpoints"
    for text, message in [("", "--workdir is empty"), ("  ", "--workdir is empty"),
                          ("s3://bucket/a", "s3:// is not supported"),
                          ("memory://a", "memory:// is not supported"), ("gs://", "names no bucket")]:
        with pytest.raises(workdir.WorkdirError, match=message):
            workdir.resolve(text)


def test_unusable_local_workdirs_are_refused_without_writing(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("not a directory")
    with pytest.raises(workdir.WorkdirError, match="is a file, not a directory"):
        workdir.check_writable(str(a_file))
    with pytest.raises(workdir.WorkdirError, match="cannot be created: .*file is a file"):
        workdir.check_writable(str(a_file / "run"))
    workdir.check_writable(str(tmp_path / "new" / "run"))  # creatable: fine, and not created
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_read_only_workdir_is_refused(tmp_path, monkeypatch):
    """Read-only for this user (os.access), or for everyone, root included (the write probe)."""
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(workdir.WorkdirError, match=f"workdir {tmp_path}/run is not writable .*read-only"):
        workdir.check_writable(str(tmp_path / "run"))
    monkeypatch.undo()

    def read_only_disk(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(workdir.tempfile, "TemporaryFile", read_only_disk)
    with pytest.raises(workdir.WorkdirError, match="is not writable .*Read-only file system"):
        workdir.check_writable(str(tmp_path))


class _LocalBucket:
    """gs://bucket/... served from a local directory: a stand-in for GCS behind etils.epath (its
    own test double) and behind orbax (whose TensorStore GCS driver cannot be faked offline)."""

    def __init__(self, root):
        self.root = str(root)

    def local(self, path):
        path = os.fspath(path)
        return os.path.join(self.root, path[len("gs://"):]) if path.startswith("gs://") else path

    def mocks(self):
        def redirect(original, path, *args, **kwargs):
            return original(self.local(path), *args, **kwargs)

        def redirect2(original, path, dst, *args, **kwargs):
            return original(self.local(path), self.local(dst), *args, **kwargs)

        names = ("exists", "glob", "isdir", "listdir", "makedirs", "mkdir", "open", "remove",
                 "rmtree", "stat", "walk")
        return {**{n: redirect for n in names}, **{n: redirect2 for n in ("copy", "rename", "replace")}}


@pytest.fixture
def gs_bucket(tmp_path, monkeypatch):
    """gs://bucket/... served from tmp_path/gcs/bucket, for epath and orbax alike; cwd is tmp_path."""
    bucket = _LocalBucket(tmp_path / "gcs")
    os.makedirs(bucket.local("gs://bucket"))
    monkeypatch.chdir(tmp_path)  # where os.path.abspath("gs://...") would have put things
    real_manager = checkpointing.ocp.CheckpointManager
    bucket.managers = []

    def manager(directory, *args, **kwargs):
        bucket.managers.append(str(directory))
        return real_manager(bucket.local(directory), *args, **kwargs)

    monkeypatch.setattr(checkpointing.ocp, "CheckpointManager", manager)
    # mock_epath swaps the backends epath picks without TensorFlow; with TensorFlow installed epath
    # takes tf.io.gfile for gs:// instead, past the mock (etils 1.15), unless told TF is absent.
    from etils.epath import gpath

    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
    with epath_testing.mock_epath(**bucket.mocks()):
        yield bucket


def test_gs_workdir_end_to_end_through_epath_and_orbax(gs_bucket, tmp_path):
    """Train and export in gs://bucket/run: every file lands in the bucket, none in ./gs:."""
    config = tiny_config(train_steps=2, plot=True, **{"checkpoint.every_steps": 2})
    mesh = parallel.make_mesh(jax.devices()[:1])
    with fast_compile():
        result = train.train_and_evaluate(config, workdir.resolve("gs://bucket/run"),
                                          data=tiny_data(mesh, config), mesh=mesh)
    assert result["step"] == 2 and epath.Path("gs://bucket/run/export/params_step2.npz").exists()
    assert gs_bucket.managers and all(d == "gs://bucket/run/checkpoints" for d in gs_bucket.managers)
    local = tmp_path / "gcs" / "bucket" / "run"
    assert sorted(os.listdir(local)) == ["LOCK", "checkpoints", "config.json", "export", "metrics.jsonl",
                                         "results.json", "tensorboard", "training_curves.png"]
    assert json.loads((local / "LOCK").read_text())["released"] is True  # the lease, given back
    assert os.listdir(local / "checkpoints") == ["2"]
    assert [r["step"] for r in read_metrics(str(local / "metrics.jsonl"))] == [2, 2]  # train, eval
    assert sorted(os.listdir(tmp_path)) == ["gcs"]  # nothing under ./gs:


def test_gs_metrics_resume_drops_replayed_rows(gs_bucket, tmp_path):
    with MetricWriter("gs://bucket/run") as writer:
        for step in (1, 2, 3):
            writer.write_scalars(step, {"loss": 1.0 / step}, prefix="train/")
    with MetricWriter("gs://bucket/run", resume_step=2) as writer:
        writer.write_scalars(3, {"loss": 0.5}, prefix="train/")
    local = tmp_path / "gcs" / "bucket" / "run"
    assert [(r["step"], r["train/loss"]) for r in read_metrics(str(local))] == [(1, 1.0), (2, 0.5), (3, 0.5)]
    assert len(os.listdir(local / "tensorboard")) == 2
    assert sorted(os.listdir(tmp_path)) == ["gcs"]


# ----------------------------------------------------------------------------------------------
# One run per workdir
# ----------------------------------------------------------------------------------------------

_HOLD_LOCK = """
import os, sys, time
from saitjax.workdir import WorkdirLock
WorkdirLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(60)
"""


def test_second_run_refused_while_the_first_lives_and_lock_of_a_dead_one_taken_over(tmp_path, caplog):
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(workdir.WorkdirBusyError, match=f"in use by another run: pid {holder.pid} on host "
                                                           f"{socket.gethostname()} \\(since "):
            workdir.WorkdirLock(str(tmp_path)).acquire()
    finally:
        holder.kill()  # SIGKILL: no chance to release
        holder.wait()
    with caplog.at_level(logging.WARNING), workdir.WorkdirLock(str(tmp_path)) as lock:
        assert f"previous run (pid {holder.pid} on host" in caplog.text and "taking it over" in caplog.text
        with pytest.raises(workdir.WorkdirBusyError, match=f"pid {os.getpid()} "):
            workdir.WorkdirLock(str(tmp_path)).acquire()  # a second owner in this process, too
    assert json.loads((tmp_path / "LOCK").read_text())["released"] is True
    assert lock.path == str(tmp_path / "LOCK")


def test_training_refused_in_an_owned_workdir_changes_nothing(tmp_path):
    config = tiny_config()
    mesh = parallel.make_mesh(jax.devices()[:1])
    with workdir.WorkdirLock(str(tmp_path)):
        with pytest.raises(workdir.WorkdirBusyError, match="Two runs in one workdir"):
            train.train_and_evaluate(config, str(tmp_path), data=tiny_data(mesh, config), mesh=mesh)
    assert os.listdir(tmp_path) == ["LOCK"]


def _lease(path, **owner):
    path.write_text(json.dumps({"since": "2026-01-01T00:00:00+00:00", **owner}))


def test_remote_lease_names_a_live_owner_and_expires(tmp_path):
    """The lease used where flock is unavailable (gs://), exercised on a local directory."""
    lock_file = tmp_path / "LOCK"
    _lease(lock_file, host="other-host", pid=1, renewed=time.time())
    with pytest.raises(workdir.WorkdirBusyError, match="pid 1 on host other-host .*lease expires 600 s after"):
        workdir.WorkdirLock(str(tmp_path), lease=True).acquire()
    _lease(lock_file, host="other-host", pid=1, renewed=time.time() - 601)  # not renewed: stale
    lock = workdir.WorkdirLock(str(tmp_path), lease=True, renew_s=0.05).acquire()
    time.sleep(0.3)
    assert json.loads(lock_file.read_text())["renewed"] > time.time() - 1  # kept alive by its thread
    lock.release()
    assert json.loads(lock_file.read_text())["released"] is True
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _lease(lock_file, host=socket.gethostname(), pid=int(dead.stdout), renewed=time.time())
    workdir.WorkdirLock(str(tmp_path), lease=True, renew_s=0.05).acquire().release()  # a dead pid here: stale
