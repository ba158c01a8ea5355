"""The command line: configs, overrides and bad input, end to end on the generated dataset."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import jax

from saitjax import train
from saitjax.config import parse_arg

from train_fixtures import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args, timeout=600):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    return subprocess.run([sys.executable, "-m", "saitjax.main", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env=env)


@pytest.mark.parametrize("name, arg", [("demo", None), ("demo_dense", None), ("deit_small_imagenet", None),
                                       ("sait_deit_imagenet", "size=tiny,init=deit_t.npz"),
                                       ("sait_deit_imagenet", "size=base,init=deit_b.npz")])
def test_configs_build_and_validate(name, arg):
    config = load_config(name, arg)
    assert config.model
    with pytest.raises(AttributeError):
        config.batch_sise = 3  # locked: a misspelt field cannot be set silently


def test_typed_config_arguments():
    a = parse_arg("epochs=2.5,batch=32,name=x,flag=false", epochs=1.0, batch=8, name="", flag=True)
    assert (a.epochs, a.batch, a.name, a.flag) == (2.5, 32, "x", False)
    with pytest.raises(ValueError, match="Did you mean 'batch'"):
        parse_arg("bacth=3", batch=8)
    with pytest.raises(ValueError, match="is not a int"):
        parse_arg("batch=3.5", batch=8)


@pytest.mark.usefixtures("fast_xla")
def test_demo_config_trains_on_generated_tiny_dataset(tmp_path):
    """The demo recipe on `saitjax_shapes/tiny` with the real TFDS pipeline, 8 devices, resumed."""
    config = load_config("demo", f"dataset=saitjax_shapes/tiny,data_dir={tmp_path / 'tfds'},batch=32")
    config.unlock()
    config.data.image_size = 32
    config.model_kwargs.img_size = 32
    config.train_steps = 6
    config.checkpoint.every_steps = 3
    config.eval.batch_size = 48  # does not divide the 128 test images: exact eval pads
    config.eval.sweep = ("dense", "mass:0.8")  # the demo's six: ~20 s more, tested in test_method_sait
    config.lock()
    workdir = str(tmp_path / "run")
    first = train.train_and_evaluate(config, workdir, max_steps=3)
    assert first["step"] == 3
    result = train.train_and_evaluate(config, workdir)  # resumes at step 3
    assert result["step"] == 6 and result["eval"]["dense"]["count"] == 128
    assert os.path.exists(os.path.join(workdir, "training_curves.png"))
    assert jax.device_count() == 8


# (arguments after `[--config configs/demo.py] --workdir {w}`, a fragment of the one error line);
# {tmp} is the test's directory, {w} a workdir holding an earlier run's config.json. Kinds of bad
# input with the same path through main as a case here are tested in-process (test_config.py,
# test_workdir.py): each case costs a process start (~1.5 s of CPU).
BAD_INPUTS = [
    (("--config", "configs/nope.py"), "config file configs/nope.py: no such file"),
    (("--config", "{tmp}/syntax_error.py"), "config file {tmp}/syntax_error.py, line 1: invalid syntax"),
    (("--workdir=",), "--workdir is empty"),
    (("--workdir", "{tmp}/a_file"), "workdir {tmp}/a_file is a file, not a directory"),
    (("--config.optim.lr=-0.001",), "invalid config: optim.lr=-0.001 must be > 0"),
    (("--config.eval.batch_size=3",), "eval.batch_size=3 is not divisible by the 2 devices"),
    (("--config.batch_sise=8",), 'Did you mean "batch_size"'),
    (("--config.data.name=saitjax_shapez",), "Did you mean 'saitjax_shapes'"),
    (("--config.data.name=imagefolder:/no/such/dir",), "ImageFolder root '/no/such/dir' does not exist"),
    (("--config", "configs/deit_small_imagenet.py", "--config.data.data_dir={tmp}/missing"), "does not exist"),
    (("--config.init={tmp}/missing.npz",), "config.init='{tmp}/missing.npz': no such file"),
    (("--mode", "eval", "--workdir", "{tmp}/never_trained"), "no checkpoint in {tmp}/never_trained/checkpoints"),
    (("--mode", "eval", "--config.init={tmp}/missing.npz"), "config.init='{tmp}/missing.npz': no such file"),
    (("--config.teacher={tmp}/teacher.npz",), "config.teacher='{tmp}/teacher.npz': no such file"),
]


def _listing(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files)


def test_cli_bad_inputs_one_error_line_exit_2_nothing_written(tmp_path):
    """Every bad input: exit status 2, one `error:` line naming the problem, no traceback, and no
    file written anywhere under tmp_path (the workdir included). Run side by side: ~2 s each."""
    (tmp_path / "syntax_error.py").write_text("def get_config(:\n")
    (tmp_path / "a_file").write_text("")
    os.makedirs(tmp_path / "w")
    (tmp_path / "w" / "config.json").write_text("{}")  # an earlier run's file: left as it is
    before = _listing(tmp_path)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    cases = []
    for args, fragment in BAD_INPUTS:
        config = () if "--config" in args else ("--config", "configs/demo.py")  # --config once only
        full = [a.format(tmp=tmp_path, w=tmp_path / "w") for a in (*config, "--workdir", "{w}", *args)]
        cases.append(([sys.executable, "-m", "saitjax.main", *full], fragment.format(tmp=tmp_path)))
    for start in range(0, len(cases), 4):  # four at a time: 2 cores, and other tests may be running
        procs = [(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True), fragment) for cmd, fragment in cases[start:start + 4]]
        for proc, fragment in procs:
            _, err = proc.communicate(timeout=300)
            lines = [line for line in err.splitlines() if line.startswith("error:")]
            assert proc.returncode == 2 and len(lines) == 1 and fragment in lines[0], (fragment, err[-2000:])
            assert "Traceback" not in err, err[-2000:]
    assert _listing(tmp_path) == before


def test_library_info_logs_only_with_verbose():
    """orbax logs through absl's logger: silenced below WARNING unless --verbose; ours stay at INFO."""
    import logging

    from absl import logging as absl_logging

    from saitjax.main import set_log_levels

    saved = {name: logging.getLogger(name).level for name in ("", "absl", "jax._src.xla_bridge")}
    try:
        set_log_levels(verbose=False)
        assert absl_logging.get_absl_logger() is logging.getLogger("absl")
        assert not logging.getLogger("absl").isEnabledFor(logging.INFO)
        assert logging.getLogger("absl").isEnabledFor(logging.WARNING)
        assert logging.getLogger("saitjax.train").isEnabledFor(logging.INFO)
        set_log_levels(verbose=True)
        assert logging.getLogger("absl").isEnabledFor(logging.INFO)
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
