"""The trainer's view of a dataset: sizes, and global batches for training and evaluation."""

from __future__ import annotations

from typing import Any, Iterator

import jax
import ml_collections

from saitjax import parallel
from saitjax.data import pipeline


class TFDSData:
    """TFDS (or ImageFolder) input for :func:`saitjax.train.train_and_evaluate`.

    Each process reads its own shard and contributes ``batch_size / process_count`` rows to
    every global batch. Training batches are a deterministic function of (seed, step), so a
    resumed run continues the exact stream of an uninterrupted one.
    """

    def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *, patch_size: int):
        self.config = config
        self.mesh = mesh
        self.patch_size = patch_size
        d = config.data
        self._common = dict(data_dir=d.data_dir or None, manual_dir=d.manual_dir or None,
                            image_size=d.image_size, mean=tuple(d.mean), std=tuple(d.std))
        info = pipeline.dataset_info(d.name, data_dir=self._common["data_dir"],
                                     manual_dir=self._common["manual_dir"])
        for split in (d.train_split, d.eval_split):
            if split not in info["splits"]:
                raise ValueError(f"invalid config: split {split!r} is not in {d.name} "
                                 f"(splits: {sorted(info['splits'])})")
        self.num_classes = info["num_classes"]
        self.num_train_examples = info["splits"][d.train_split]
        self.num_eval_examples = info["splits"][d.eval_split]
        self.per_host_batch = parallel.check_batch_size(config.batch_size, mesh)
        self.per_host_eval_batch = parallel.check_batch_size(config.eval.batch_size, mesh, "eval.batch_size")
        self._sharding = parallel.batch_sharded(mesh)

    def train_batches(self, start_step: int = 0) -> Iterator[Any]:
        d = self.config.data
        ds = pipeline.make_dataset(
            d.name, d.train_split, train=True, per_host_batch_size=self.per_host_batch,
            crop_scale=tuple(d.crop_scale), hflip=d.hflip, randaugment=d.randaugment or None,
            shuffle_buffer=d.shuffle_buffer, seed=self.config.seed, cache=d.cache,
            start_step=start_step, **self._common)
        return pipeline.global_batches(ds, self._sharding)

    def eval_batches(self, keep_mask: bool | None = None) -> Iterator[Any]:
        d = self.config.data
        keep_mask = self.config.eval.keep_mask if keep_mask is None else keep_mask
        ds = pipeline.make_dataset(
            d.name, d.eval_split, train=False, per_host_batch_size=self.per_host_eval_batch,
            crop_pct=d.crop_pct, keep_mask=keep_mask, cache=d.cache, **self._common)
        return pipeline.global_batches(ds, self._sharding)
