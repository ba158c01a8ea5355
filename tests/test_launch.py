"""Training sweeps: expansion of get_sweep into runs, up-front checks, dry run, and a local sweep
that is killed midway and completed by running it again (real runs of `saitjax.main`)."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

from saitjax import launch, run_results

SWEEP_CONFIG = '''
from saitjax.config import base_config, finalize, parse_arg, shapes_demo_data


def get_config(arg=None):
    a = parse_arg(arg, data_dir="", lr=3e-3, steps=6)
    c = base_config()
    c.model = "vit_test_patch4_32"
    c.model_kwargs.num_classes = 8
    c.model_kwargs.drop_path_rate = 0.0
    shapes_demo_data(c, "saitjax_shapes/tiny", a.data_dir)
    c.data.image_size = 32
    c.batch_size = 16
    c.train_steps = a.steps
    c.optim.update(lr=a.lr, warmup_steps=1, min_lr=1e-5)
    c.eval.update(every_steps=1000, batch_size=64)
    c.checkpoint.update(every_steps=2, async_save=False)
    c.log_every_steps = 1
    c.plot = False
    return finalize(c)


def get_sweep(hyper):
    return {sweep}
'''


def write_config(tmp_path, sweep: str) -> str:
    path = tmp_path / "sweep_config.py"
    path.write_text(SWEEP_CONFIG.replace("{sweep}", sweep))
    return str(path)


GRID = 'hyper.product([hyper.sweep("arg.lr", [3e-3, 1e-3]), hyper.sweep("config.seed", [0, 1]), ' \
       'hyper.fixed("arg.steps", 4)])'


def test_expansion_names_workdirs_and_commands(tmp_path):
    config = write_config(tmp_path, GRID)
    runs = launch.plan(f"{config}:data_dir=/data", str(tmp_path / "root"))
    assert [r.name for r in runs] == ["lr=0.003_seed=0", "lr=0.003_seed=1", "lr=0.001_seed=0", "lr=0.001_seed=1"]
    assert runs[1].params == {"lr": 3e-3, "seed": 1}  # the fixed steps vary nowhere: not in names or tables
    assert runs[1].config_arg == "data_dir=/data,lr=0.003,steps=4"
    assert runs[1].overrides == {"seed": 1}
    assert runs[1].workdir == str(tmp_path / "root" / "lr=0.003_seed=1")
    assert runs[1].command(config) == ["python", "-m", "saitjax.main", "--config",
                                       f"{config}:data_dir=/data,lr=0.003,steps=4",
                                       "--workdir", runs[1].workdir, "--config.seed=1"]
    built = launch.build_config(config, runs[3])
    assert (built.optim.lr, built.seed, built.train_steps, built.data.data_dir) == (1e-3, 1, 4, "/data")


def test_dry_run_checks_every_run_and_prints_the_commands(tmp_path, capsys):
    config = write_config(tmp_path, GRID)
    root = tmp_path / "root"
    assert launch.main(["--config", config, "--workdir", str(root), "--dry-run"]) == 0
    commands = [shlex.split(line) for line in capsys.readouterr().out.splitlines()]
    assert len(commands) == 4 and all(c[:3] == ["python", "-m", "saitjax.main"] for c in commands)
    assert not root.exists()  # a dry run writes nothing


@pytest.mark.parametrize("sweep, message", [
    ('hyper.sweep("config.optim.lr", [1e-3, -1.0, float("nan")])',
     r"2 of the 3 runs .*nothing was started.*lr=-1: invalid config: optim.lr=-1.0 must be > 0"),
    ('hyper.sweep("config.batch_size", [16, 2.5])', r"1 of the 2 runs .*batch_size=2.5"),
    ('hyper.sweep("config.optim.lrr", [1e-3])', r"config has no field 'optim.lrr'"),
    ('hyper.sweep("arg.rho", [0.5])', r"unknown config argument 'rho'"),
    ('hyper.sweep("config.eval.densities", [("dense",), ("topk:0.5",)])', r"topk:0.5"),
    ('hyper.sweep("config.seed", [0, 0])', r"the same run twice"),
    ('[]', r"non-empty list of dicts"),
])
def test_a_bad_value_in_any_run_fails_the_sweep_before_anything_runs(tmp_path, capsys, sweep, message):
    config = write_config(tmp_path, sweep)
    root = tmp_path / "root"
    assert launch.main(["--config", config, "--workdir", str(root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert re.search(message, " ".join(err.split())), err
    assert not root.exists()


def test_a_config_without_get_sweep_is_refused(tmp_path, capsys):
    path = tmp_path / "plain.py"
    path.write_text(SWEEP_CONFIG.split("def get_sweep")[0])
    assert launch.main(["--config", str(path), "--workdir", str(tmp_path / "r")]) == 2
    assert "defines no get_sweep(hyper)" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.usefixtures("fast_xla")
def test_local_sweep_killed_midway_completes_only_the_missing_runs(tmp_path, capfd):
    config = write_config(tmp_path, 'hyper.sweep("config.seed", [0, 1])')
    arg = f"{config}:data_dir={tmp_path / 'tfds'}"
    root = tmp_path / "root"
    first = subprocess.Popen([sys.executable, "-m", "saitjax.launch", "--config", arg, "--workdir", str(root)],
                             start_new_session=True)
    try:  # kill the whole sweep (launcher and run) once the second run has started training
        deadline = time.time() + 300
        while not (root / "seed=1" / "metrics.jsonl").exists():
            assert first.poll() is None and time.time() < deadline, "the sweep ended before it could be killed"
            time.sleep(0.05)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert run_results.read_record(str(root / "seed=0")) is not None
    assert run_results.read_record(str(root / "seed=1")) is None
    finished_first = os.path.getmtime(root / "seed=0" / "results.json")

    capfd.readouterr()
    assert launch.main(["--config", arg, "--workdir", str(root)]) == 0
    out = capfd.readouterr().out
    assert "[1/2] seed=0: finished earlier, skipped" in out and "[2/2] seed=1: finished in" in out
    assert os.path.getmtime(root / "seed=0" / "results.json") == finished_first

    report = json.loads((root / "results.json").read_text())
    assert [(r["run"], r["density"], r["status"]) for r in report["rows"]] == [
        ("seed=0", "dense", "finished"), ("seed=1", "dense", "finished")]
    for row in report["rows"]:
        assert row["count"] == 128 and 0 <= row["top1"] <= 1 and row["wall_time_s"] > 0 and row["step"] == 6
        assert row["gmacs_executed"] == row["gmacs"] > 0
    (summary,) = report["summary"]  # the seed axis folded: mean ± sd of the two runs
    tops = [r["top1"] for r in report["rows"]]
    assert summary["n"] == 2 and summary["top1"] == pytest.approx(sum(tops) / 2)
    assert summary["top1_sd"] == pytest.approx(abs(tops[0] - tops[1]) / 2 ** 0.5)
    table = (root / "results.md").read_text()
    assert "Mean ± sd over seed" in table and "| seed=0 |" not in table.split("Each run:")[0]
    assert os.path.getsize(root / "results.png") > 1000
    assert launch.main(["--workdir", str(root), "--results"]) == 0  # the table alone, again


@pytest.mark.parametrize("name, arg", [("demo", ""), ("dynamicvit_demo", "init={init}")])
def test_the_sweeps_of_the_shipped_configs_expand_and_check(tmp_path, name, arg):
    (tmp_path / "dense.npz").write_bytes(b"")  # only its presence is checked before a run
    config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", f"{name}.py")
    spec = f"{config}:{arg.format(init=tmp_path / 'dense.npz')}" if arg else config
    runs = launch.plan(spec, str(tmp_path / "root"))
    launch.check(config, runs)
    assert len(runs) == 3 and len({r.workdir for r in runs}) == 3


def test_a_root_holding_another_sweep_is_refused_and_results_need_a_plan(tmp_path, capsys):
    config = write_config(tmp_path, GRID)
    root = str(tmp_path / "root")
    launch.write_plan(root, config, launch.plan(config, root))
    with pytest.raises(ValueError, match="holds a sweep of --config .*another --workdir"):
        launch.write_plan(root, f"{config}:lr=0.1", launch.plan(config, root))
    assert launch.main(["--workdir", str(tmp_path / "empty"), "--results"]) == 2
    assert "no sweep in" in capsys.readouterr().err
