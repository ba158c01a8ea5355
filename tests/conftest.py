"""Test setup: 8 virtual CPU devices, set before JAX initialises its backends."""

import atexit
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# TensorFlow (used only by saitjax.data) must not grab the accelerator or spam logs.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# One XLA compilation cache per test session, fresh (so a run still compiles every program once):
# many tests build the same tiny programs (one model at one spec in several tests; subprocess runs
# of what was trained in-process), and each is then compiled once. About a third of the run's time.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="saitjax_tests_xla_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a test that takes more than ~30 s on 2 CPU cores")
    config.addinivalue_line("markers", "torch: needs PyTorch (and timm) for parity with a reference")
    config.addinivalue_line("markers", "extended: full-size parity and 224 px trainer runs, outside the default "
                                       "run (pytest.ini deselects them; run with: pytest -m extended)")


@pytest.fixture
def fast_xla():
    """XLA without most optimisations for this test (tiny programs compile ~2x faster): for tests
    of the plumbing around training (paths, resume, sweeps, logging), whose numbers are compared
    only with runs under the same setting. Subprocesses inherit it through the environment."""
    import jax

    previous = os.environ.get("JAX_DISABLE_MOST_OPTIMIZATIONS")
    os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", False)
        if previous is None:
            os.environ.pop("JAX_DISABLE_MOST_OPTIMIZATIONS", None)
        else:
            os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = previous
