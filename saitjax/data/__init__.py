"""Input data: TFDS / ImageFolder pipelines, DeiT preprocessing, mixing, the shapes dataset.

Imports are lazy: ``import saitjax.data.mixing`` (pure JAX) or ``saitjax.data.patch_mask``
(NumPy) never import TensorFlow; only the pipeline, preprocessing and builder modules do.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    # pipeline.py (TF)
    "make_dataset": "pipeline", "num_eval_batches": "pipeline", "open_dataset": "pipeline",
    "dataset_info": "pipeline", "to_global_batch": "pipeline", "global_batches": "pipeline",
    "data_sharding": "pipeline", "prefetch_to_device": "pipeline",
    # preprocess.py / randaugment.py (TF)
    "train_preprocess": "preprocess", "eval_preprocess": "preprocess",
    "IMAGENET_MEAN": "preprocess", "IMAGENET_STD": "preprocess",
    "INCEPTION_MEAN": "preprocess", "INCEPTION_STD": "preprocess",
    "rand_augment": "randaugment", "parse_randaugment": "randaugment",
    # shapes_builder.py (TF)
    "build_shapes_dataset": "shapes_builder", "SaitjaxShapes": "shapes_builder",
    "CLASS_NAMES": "shapes_builder",
    # mixing.py (JAX only) and object_masks.py (NumPy only)
    "mixup_cutmix": "mixing", "smooth_one_hot": "mixing",
    "patch_mask": "object_masks", "patch_masks": "object_masks",
    "patch_fractions": "object_masks",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'saitjax.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"saitjax.data.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
