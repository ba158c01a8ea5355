"""Trainer: multi-device equivalence, checkpoints across topologies, resume, errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from saitjax import parallel, train
from saitjax.checkpointing import CheckpointMismatchError, Checkpointer
from saitjax.metrics import read_metrics

from train_fixtures import fast_compile, tiny_config, tiny_data

WORKER = os.path.join(os.path.dirname(__file__), "train_worker.py")


def _run_steps(devices, config, steps=3):
    """Run ``steps`` update steps on a mesh of ``devices``; return params on the host."""
    mesh = parallel.make_mesh(devices)
    run = train.Run(config, "/nonexistent-unused", data=tiny_data(mesh, config), mesh=mesh)
    state = run.restore_or_init()
    step_fn = run.jitted_train_step()
    batches = run.data.train_batches(0)
    for step in range(steps):
        state, metrics = step_fn(state, next(batches), None, run.method.train_sparsity(step))
    return jax.device_get(state.params), jax.device_get(metrics)


def test_eight_devices_match_one(tmp_path):
    assert jax.device_count() == 8
    config = tiny_config()
    one, m1 = _run_steps(jax.devices()[:1], config)
    eight, m8 = _run_steps(jax.devices(), config)
    np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4), one, eight)


def _losses(devices, config, steps):
    mesh = parallel.make_mesh(devices)
    run = train.Run(config, "/nonexistent-unused", data=tiny_data(mesh, config), mesh=mesh)
    state, step_fn, batches = run.restore_or_init(), run.jitted_train_step(), run.data.train_batches(0)
    losses = []
    for step in range(steps):
        state, metrics = step_fn(state, next(batches), None, run.method.train_sparsity(step))
        losses.append(float(jax.device_get(metrics["loss"])))
    return losses, state


@pytest.mark.usefixtures("fast_xla")
def test_bfloat16_compute_trains_like_float32_with_float32_state():
    """bf16 matmuls, float32 parameters, optimizer state, softmax and logits: the loss curve of a
    few steps follows float32's (the demo-scale accuracy comparison is in README "Pods")."""
    config = tiny_config(train_steps=12, **{"mixup.prob": 0.0})
    f32, _ = _losses(jax.devices()[:2], config, 12)
    config = tiny_config(train_steps=12, **{"mixup.prob": 0.0, "compute.precision": "bfloat16"})
    bf16, state = _losses(jax.devices()[:2], config, 12)
    assert {leaf.dtype for leaf in jax.tree.leaves((state.params, state.opt_state)) if leaf.ndim} == {np.dtype("float32")}
    np.testing.assert_allclose(bf16, f32, rtol=0.02)
    assert bf16[-1] < bf16[0] - 0.3  # and it learns


def test_train_evaluate_save_on_8_restore_on_1(tmp_path):
    config = tiny_config()
    mesh8 = parallel.make_mesh()
    result = train.train_and_evaluate(config, str(tmp_path), data=tiny_data(mesh8, config))
    assert result["step"] == 16 and result["eval"]["dense"]["count"] == 40
    assert result["eval"]["dense"]["top1"] > 0.5  # four easy classes, chance is 0.25
    assert sorted(os.listdir(tmp_path / "checkpoints"), key=int) == ["4", "8", "12", "16"]
    assert os.path.exists(tmp_path / "export" / "params_step16.npz")
    records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert any("train/loss" in r for r in records) and any("eval/top1@dense" in r for r in records)
    assert os.listdir(tmp_path / "tensorboard")

    # restore the 8-device checkpoint onto a 1-device mesh
    mesh1 = parallel.make_mesh(jax.devices()[:1])
    run = train.Run(config, str(tmp_path), data=tiny_data(mesh1, config), mesh=mesh1)
    state = run.restore_or_init()
    assert int(state.step) == 16
    assert state.params["head"]["kernel"].sharding.mesh.devices.size == 1
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params),
                 jax.device_get(result["state"].params))
    # --mode eval on the restored checkpoint reproduces the final evaluation
    again = train.evaluate_checkpoint(config, str(tmp_path), data=tiny_data(mesh1, config), mesh=mesh1)
    assert again["dense"]["top1"] == pytest.approx(result["eval"]["dense"]["top1"])
    # the finished run started again: evaluates, records nothing twice
    rerun = train.train_and_evaluate(config, str(tmp_path), data=tiny_data(mesh1, config), mesh=mesh1)
    assert rerun["step"] == 16 and rerun["eval"]["dense"]["top1"] == pytest.approx(result["eval"]["dense"]["top1"])
    steps = [(r["step"], "eval" if "eval/top1@dense" in r else "train") for r in read_metrics(str(tmp_path))]
    assert len(steps) == len(set(steps)) and steps[-1] == (16, "eval")


def _worker(*args, env=None):
    return subprocess.run([sys.executable, WORKER, *map(str, args)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})


def _load(path):
    with np.load(path) as f:
        return [f[k] for k in f.files if k != "top1"]


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_matches_uninterrupted(tmp_path):
    straight = _worker(tmp_path / "a", tmp_path / "a.npz")
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = _worker(tmp_path / "b", tmp_path / "b.npz", "--kill-at", 14)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert Checkpointer(str(tmp_path / "b" / "checkpoints")).latest_step() in (8, 12)
    assert not os.path.exists(tmp_path / "b.npz")
    resumed = _worker(tmp_path / "b", tmp_path / "b.npz")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for a, b in zip(_load(tmp_path / "a.npz"), _load(tmp_path / "b.npz")):
        np.testing.assert_array_equal(a, b)


def test_sigterm_saves_and_exits_with_status_143(tmp_path):
    out = _worker(tmp_path / "w", tmp_path / "w.npz", "--kill-at", 6, "--signal", "SIGTERM")
    assert out.returncode == 143, out.stderr[-3000:]  # 128 + SIGTERM: interrupted, not finished
    # the step being fetched when the signal arrived is finished, saved, and the run stops
    assert Checkpointer(str(tmp_path / "w" / "checkpoints")).latest_step() == 7
    assert not os.path.exists(tmp_path / "w" / "export")


def test_init_from_pretrained_params_keeps_a_fresh_head(tmp_path):
    import saitjax
    from saitjax.convert import save_params

    donor = saitjax.create_model("vit_test_patch4_32")  # 10 classes: the head does not fit
    donor_params = donor.init(jax.random.key(7), jnp.zeros((1, 32, 32, 3)))["params"]
    path = save_params(str(tmp_path / "donor.npz"), donor_params, model="vit_test_patch4_32")
    config = tiny_config(init=path)
    mesh = parallel.make_mesh()
    state = train.Run(config, str(tmp_path / "w"), data=tiny_data(mesh, config), mesh=mesh).restore_or_init()
    params = jax.device_get(state.params)
    np.testing.assert_array_equal(params["blocks_2"]["mlp"]["fc1"]["kernel"],
                                  donor_params["blocks_2"]["mlp"]["fc1"]["kernel"])
    assert params["head"]["kernel"].shape == (32, 4)  # re-initialised for the 4 classes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_the_same_global_batch_as_one(tmp_path):
    single = _worker(tmp_path / "single", tmp_path / "single.npz", "--devices", 2)
    assert single.returncode == 0, single.stderr[-3000:]
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, WORKER, tmp_path / "multi", tmp_path / "multi.npz",
                               "--process-id", str(i), "--num-processes", "2", "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    for a, b in zip(_load(tmp_path / "single.npz"), _load(tmp_path / "multi.npz")):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


def test_workdir_of_another_model_is_refused_and_left_intact(tmp_path):
    config = tiny_config(train_steps=4)
    mesh = parallel.make_mesh()
    train.train_and_evaluate(config, str(tmp_path), data=tiny_data(mesh, config))
    before = sorted(os.listdir(tmp_path / "checkpoints"))
    other = tiny_config(train_steps=4, model="vit_test_distilled_patch4_32")
    with pytest.raises(CheckpointMismatchError, match="vit_test_patch4_32.*Nothing was changed"):
        train.train_and_evaluate(other, str(tmp_path), data=tiny_data(mesh, other))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == before


def test_nan_loss_stops_without_checkpointing_the_bad_state(tmp_path):
    config = tiny_config(train_steps=8)
    config.optim.lr = 1e30  # explodes within a few steps
    config.optim.grad_clip_norm = 0.0
    mesh = parallel.make_mesh()
    # lr 1e30 makes step 3 the first non-finite one (deterministic: fixed seeds and data); the
    # first scheduled checkpoint (every 4 steps) would be step 4, i.e. already the bad state,
    # so no checkpoint at all may exist
    with pytest.raises(train.NonFiniteLossError, match=r"NaN/inf at step 3 .*last checkpoint: step None"):
        train.train_and_evaluate(config, str(tmp_path), data=tiny_data(mesh, config))
    saved = Checkpointer(str(tmp_path / "checkpoints")).all_steps()
    assert list(saved) == []


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="unknown model 'deit_smal'"):
        train.Run(tiny_config(model="deit_smal"), "/tmp/unused")
    with pytest.raises(ValueError, match="data.image_size=48 but vit_test_patch4_32 takes 32 px"):
        train.Run(tiny_config(**{"data.image_size": 48}), "/tmp/unused")
    with pytest.raises(ValueError, match="batch_size=12 is not divisible by the 8 devices"):
        config = tiny_config(batch_size=12)
        train.Run(config, "/tmp/unused", data=tiny_data(parallel.make_mesh(jax.devices()[:4]), tiny_config()))
    with pytest.raises(ValueError, match="dataset has 4 classes but the model has num_classes=10"):
        c = tiny_config(**{"model_kwargs.num_classes": 10})
        train.Run(c, "/tmp/unused", data=tiny_data(parallel.make_mesh(), tiny_config()))


def test_ctrl_c_saves_then_a_shorter_rerun_says_it_is_past_its_steps(tmp_path):
    """SIGINT is handled like SIGTERM (save, stop, status 130); asking the saved run for fewer
    steps than it holds is refused with the step it is at, and changes nothing."""
    import signal

    config = tiny_config(train_steps=8, **{"checkpoint.every_steps": 100})
    mesh = parallel.make_mesh(jax.devices()[:1])
    data = tiny_data(mesh, config)
    batches = data.train_batches

    def interrupted(start_step):
        for step, batch in enumerate(batches(start_step), start=start_step):
            if step == 2:
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the third step's batch is fetched
            yield batch

    data.train_batches = interrupted
    with fast_compile():
        result = train.train_and_evaluate(config, str(tmp_path), data=data, mesh=mesh)
    assert (result["stopped_by"], result["step"], train.exit_status(result)) == ("SIGINT", 3, 130)
    assert Checkpointer(str(tmp_path / "checkpoints")).all_steps() == [3]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers given back
    before = sorted(os.listdir(tmp_path)), (tmp_path / "metrics.jsonl").read_text()
    shorter = tiny_config(train_steps=2)
    with pytest.raises(ValueError, match="already holds a checkpoint at step 3, past the 2 steps"):
        train.train_and_evaluate(shorter, str(tmp_path), data=tiny_data(mesh, shorter), mesh=mesh)
    assert (sorted(os.listdir(tmp_path)), (tmp_path / "metrics.jsonl").read_text()) == before


def _damage(step_dir):
    """Truncate the largest array file of a checkpoint, as a full disk or a killed copy would."""
    files = [os.path.join(d, f) for d, _, names in os.walk(step_dir / "state") for f in names]
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.truncate(os.path.getsize(largest) // 2)


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # no orbax leftovers
def test_damaged_checkpoints_are_named_and_the_newest_intact_one_restored(tmp_path, caplog):
    import logging

    config = tiny_config()
    mesh = parallel.make_mesh(jax.devices()[:1])
    run = train.Run(config, str(tmp_path), data=tiny_data(mesh, config), mesh=mesh, train=True)
    state = run.restore_or_init()
    for step in (2, 4, 6):
        run.ckpt.save(step, state.replace(step=jnp.asarray(step, jnp.int32)), run.meta)
    run.close()
    _damage(tmp_path / "checkpoints" / "6")
    (tmp_path / "checkpoints" / "4" / "meta" / "metadata").write_text("{not json")
    with caplog.at_level(logging.WARNING):
        evaluation = train.Run(config, str(tmp_path), data=tiny_data(mesh, config), mesh=mesh)
        assert int(evaluation.restore_or_init().step) == 2  # an evaluation reads, moves nothing
        evaluation.close()
        assert sorted(os.listdir(tmp_path / "checkpoints"), key=int) == ["2", "4", "6"]
        resumed = train.Run(config, str(tmp_path), data=tiny_data(mesh, config), mesh=mesh, train=True)
        assert int(resumed.restore_or_init().step) == 2
        resumed.close()
    assert "checkpoint at step 6 in" in caplog.text and "checkpoint at step 4 in" in caplog.text
    assert "falling back to step 2, the newest intact checkpoint (unreadable: steps 6, 4)" in caplog.text
    assert "Traceback" not in caplog.text and max(map(len, caplog.text.splitlines())) < 600
    # the damaged ones are kept, out of the way of the saves at steps 4 and 6 to come
    assert os.listdir(tmp_path / "checkpoints") == ["2"]
    assert sorted(os.listdir(tmp_path / "checkpoints_unreadable")) == ["4", "6"]
