"""Test setup: 8 virtual CPU devices, set before JAX initialises its backends."""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# TensorFlow (used only by saitjax.data) must not grab the accelerator or spam logs.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a test that takes more than ~30 s on 2 CPU cores")
    config.addinivalue_line("markers", "torch: needs PyTorch (and timm) for parity with a reference")
    config.addinivalue_line("markers", "extended: full-size parity and 224 px trainer runs, outside the default "
                                       "run (pytest.ini deselects them; run with: pytest -m extended)")
