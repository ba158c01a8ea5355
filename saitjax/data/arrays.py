"""In-memory arrays as a training/evaluation source (no TensorFlow).

For notebooks, small experiments and tests: numpy images and labels in, global batches out,
with the same contract as the TFDS source (:class:`saitjax.data.source.TFDSData`): training
batches are a pure function of (seed, step) -- a shuffled permutation per epoch -- so resuming
at any step continues the identical stream, and each process contributes its own rows of every
global batch. Evaluation is exact: the tail is padded with ``valid=False`` rows.
"""

from __future__ import annotations

from typing import Any, Iterator

import jax
import numpy as np

from saitjax import parallel


class ArrayData:
    """``images [N, H, W, C]`` float32 and integer ``labels [N]`` for train and eval."""

    def __init__(self, train_images: np.ndarray, train_labels: np.ndarray, eval_images: np.ndarray,
                 eval_labels: np.ndarray, *, num_classes: int, batch_size: int, eval_batch_size: int,
                 mesh: jax.sharding.Mesh, seed: int = 0):
        if len(train_images) != len(train_labels) or len(eval_images) != len(eval_labels):
            raise ValueError("images and labels must have the same length")
        if len(train_images) < batch_size:
            raise ValueError(f"{len(train_images)} training examples cannot fill a batch of {batch_size}")
        self.train = (np.asarray(train_images, np.float32), np.asarray(train_labels, np.int32))
        self.eval = (np.asarray(eval_images, np.float32), np.asarray(eval_labels, np.int32))
        self.num_classes = num_classes
        self.num_train_examples = len(train_labels)
        self.batch_size, self.eval_batch_size, self.seed = batch_size, eval_batch_size, seed
        parallel.check_batch_size(batch_size, mesh)
        parallel.check_batch_size(eval_batch_size, mesh, "eval.batch_size")
        self.sharding = parallel.batch_sharded(mesh)

    def _local_rows(self, global_rows: np.ndarray) -> np.ndarray:
        """This process's contiguous part of a global batch (process order = row order)."""
        per_host = len(global_rows) // jax.process_count()
        start = jax.process_index() * per_host
        return global_rows[start:start + per_host]

    def global_indices(self, step: int) -> np.ndarray:
        """Example indices of the global batch of ``step`` (epoch-wise shuffled, drop remainder)."""
        per_epoch = self.num_train_examples // self.batch_size
        epoch, offset = divmod(step, per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_train_examples)
        return order[offset * self.batch_size:(offset + 1) * self.batch_size]

    def train_batches(self, start_step: int = 0) -> Iterator[dict[str, Any]]:
        images, labels = self.train
        step = start_step
        while True:
            rows = self._local_rows(self.global_indices(step))
            batch = {"image": images[rows], "label": labels[rows], "valid": np.ones(len(rows), bool)}
            yield parallel.to_global(batch, self.sharding)
            step += 1

    def eval_batches(self) -> Iterator[dict[str, Any]]:
        images, labels = self.eval
        n, b = len(labels), self.eval_batch_size
        for start in range(0, n, b):
            rows = np.arange(start, start + b)
            valid = rows < n
            rows = np.where(valid, rows, 0)
            local = self._local_rows(np.stack([rows, valid], 1))
            idx, ok = local[:, 0], local[:, 1].astype(bool)
            batch = {"image": images[idx], "label": labels[idx], "valid": ok}
            yield parallel.to_global(batch, self.sharding)
