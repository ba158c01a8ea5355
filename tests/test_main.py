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


def test_demo_config_trains_on_generated_tiny_dataset(tmp_path):
    """The demo recipe on `saitjax_shapes/tiny` with the real TFDS pipeline, 8 devices, resumed."""
    config = load_config("demo", f"dataset=saitjax_shapes/tiny,data_dir={tmp_path / 'tfds'},batch=32")
    config.unlock()
    config.data.image_size = 32
    config.model_kwargs.img_size = 32
    config.train_steps = 6
    config.checkpoint.every_steps = 3
    config.eval.batch_size = 48  # does not divide the 128 test images: exact eval pads
    config.lock()
    workdir = str(tmp_path / "run")
    first = train.train_and_evaluate(config, workdir, max_steps=3)
    assert first["step"] == 3
    result = train.train_and_evaluate(config, workdir)  # resumes at step 3
    assert result["step"] == 6 and result["eval"]["dense"]["count"] == 128
    assert os.path.exists(os.path.join(workdir, "training_curves.png"))
    assert jax.device_count() == 8


@pytest.mark.parametrize("override, message", [
    ("--config.data.name=saitjax_shapez", "Did you mean 'saitjax_shapes'"),
    ("--config.data.name=imagefolder:/no/such/dir", "ImageFolder root '/no/such/dir' does not exist"),
    ("--config.batch_sise=8", "Did you mean \"batch_size\""),
    ("--config.optim.weight_decay=-1", "optim.weight_decay=-1.0 must be >= 0"),
])
def test_cli_bad_input_names_the_problem(tmp_path, override, message):
    out = _main("--config", "configs/demo.py", "--workdir", str(tmp_path / "w"), override)
    assert out.returncode == 2, out.stderr[-2000:]
    assert message in out.stderr
    assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_cli_missing_data_dir(tmp_path):
    out = _main("--config", "configs/deit_small_imagenet.py", "--workdir", str(tmp_path / "w"),
                f"--config.data.data_dir={tmp_path / 'missing'}")
    assert out.returncode == 2
    assert "data_dir" in out.stderr and "does not exist" in out.stderr
