"""Small configs and in-memory data for trainer tests (shared by in-process and subprocess runs)."""

from __future__ import annotations

import contextlib
import os

import numpy as np

from saitjax.config import base_config, load_config_file


def tiny_config(**overrides):
    c = base_config()
    c.model = "vit_test_patch4_32"
    c.model_kwargs.num_classes = 4
    c.model_kwargs.drop_path_rate = 0.1
    c.data.name = "in-memory"
    c.data.image_size = 32
    c.mixup.update(mixup_alpha=0.0, cutmix_alpha=1.0, switch_prob=0.0, label_smoothing=0.1, prob=0.25)
    c.batch_size = 16
    c.train_steps = 16
    c.optim.update(lr=3e-3, warmup_steps=2, min_lr=1e-5, grad_clip_norm=1.0)
    c.eval.update(every_steps=1000, batch_size=24)
    c.checkpoint.update(every_steps=4, max_to_keep=5, async_save=True)
    c.log_every_steps = 2
    c.plot = False
    for key, value in overrides.items():
        target = c
        *path, leaf = key.split(".")
        for p in path:
            target = target[p]
        target[leaf] = value
    return c


def tiny_arrays(n_train: int = 64, n_eval: int = 40, seed: int = 0, size: int = 32):
    """Four classes a ViT tells apart in a few steps: a class colour over noise (``size`` px)."""
    rng = np.random.default_rng(seed)
    colours = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]], np.float32)

    def make(n):
        labels = rng.integers(0, 4, n)
        images = rng.normal(0, 0.5, (n, size, size, 3)).astype(np.float32) + colours[labels][:, None, None]
        return images, labels

    return make(n_train) + make(n_eval)


def tiny_data(mesh, config, seed: int = 0):
    from saitjax.data.arrays import ArrayData

    tr_x, tr_y, ev_x, ev_y = tiny_arrays(seed=seed, size=config.data.image_size)
    return ArrayData(tr_x, tr_y, ev_x, ev_y, num_classes=4, batch_size=config.batch_size,
                     eval_batch_size=config.eval.batch_size, mesh=mesh, seed=config.seed)


def load_config(name: str, arg: str | None = None):
    """``configs/<name>.py``'s ``get_config(arg)``."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return load_config_file(os.path.join(root, "configs", f"{name}.py"), arg)


@contextlib.contextmanager
def fast_compile():
    """XLA without most optimisations: a tiny run compiles ~2x faster; for tests of the plumbing
    around training (paths, locks, signals), not of its numbers."""
    import jax

    jax.config.update("jax_disable_most_optimizations", True)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", False)
