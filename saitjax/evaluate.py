"""Exact evaluation of one set of weights at several densities.

Every eval batch carries a ``valid`` mask (padding of the last batch, and of hosts with smaller
shards), so top-1 is over exactly the examples of the split. Each density is its own compiled
function (the spec is static); sums stay on device until the end of the pass.
"""

from __future__ import annotations

from typing import Any, Iterable

import jax
import jax.numpy as jnp

from saitjax import losses
from saitjax.flops import per_image_gmacs
from saitjax.models.core.variables import as_variables
from saitjax.sparsity import SparsitySpec

Array = jax.Array


def eval_sums(model: Any, params: Any, batch: dict[str, Array], spec: SparsitySpec) -> dict[str, Array]:
    """Per-batch sums: correct predictions, valid examples, loss, kept patch tokens.

    ``params``: a params tree, or variables with BatchNorm statistics (``as_variables``)."""
    logits, aux = model.apply(as_variables(params), batch["image"], sparsity=spec)
    valid = batch["valid"].astype(jnp.float32)
    one_hot = jax.nn.one_hot(batch["label"], logits.shape[-1])
    per_example_loss = -jnp.sum(one_hot * jax.nn.log_softmax(logits), axis=-1)
    sums = {"correct": jnp.sum(losses.correct_top1(logits, batch["label"]) * valid),
            "count": jnp.sum(valid), "loss": jnp.sum(per_example_loss * valid)}
    if aux.get("keep_masks"):
        kept = aux["keep_masks"][-1]  # [B, N_patches] after the last stage
        sums["kept_fraction"] = jnp.sum(jnp.mean(kept, axis=-1) * valid)
        for stage, stage_mask in enumerate(aux["keep_masks"]):
            sums[f"kept_fraction_s{stage}"] = jnp.sum(jnp.mean(stage_mask, axis=-1) * valid)
        if "kept_counts" in aux:  # per-image counts: the ideal cost of each image, and what ran
            counts = aux["kept_counts"]
            sums["gmacs"] = jnp.sum(per_image_gmacs(model, spec, counts) * valid)
            ran = [aux["capacity"]] * len(counts) if "capacity" in aux else counts
            sums["gmacs_executed"] = jnp.sum(per_image_gmacs(model, spec, ran) * valid)
            # how many images end with each number of patch tokens (0..N): the spread of counts
            final = jax.nn.one_hot(counts[-1], model.num_patches + 1, dtype=jnp.float32)
            sums["count_histogram"] = jnp.sum(final * valid[:, None], axis=0)
        if "capacity" in aux:  # capacity bucket each image ran in (tokens)
            sums["capacity"] = jnp.sum(aux["capacity"].astype(jnp.float32) * valid)
        if "mask" in batch:  # object masks of the generated dataset: where do kept tokens fall?
            obj = object_patches(batch["mask"], model.patch_size)
            bg = 1.0 - obj
            sums["kept_object"] = jnp.sum(jnp.sum(kept * obj, -1) / jnp.maximum(jnp.sum(obj, -1), 1) * valid)
            sums["kept_background"] = jnp.sum(jnp.sum(kept * bg, -1) / jnp.maximum(jnp.sum(bg, -1), 1) * valid)
    return sums


def object_patches(mask: Array, patch_size: int, min_fraction: float = 0.25) -> Array:
    """``[B, H, W]`` pixel masks -> ``[B, N_patches]`` 0/1: patches at least ``min_fraction`` object."""
    b, h, w = mask.shape
    p = patch_size
    frac = mask.astype(jnp.float32).reshape(b, h // p, p, w // p, p).mean(axis=(2, 4))
    return (frac >= min_fraction).astype(jnp.float32).reshape(b, -1)


class Evaluator:
    """Top-1 (and token statistics) at each ``(label, spec)`` over an eval dataset."""

    def __init__(self, model: Any, densities: list[tuple[str, SparsitySpec]]):
        self.model = model
        self.densities = list(densities)
        self._step = jax.jit(lambda p, b, spec: eval_sums(model, p, b, spec), static_argnums=2)

    def __call__(self, params: Any, batches: Iterable[dict[str, Array]],
                 densities: list[tuple[str, SparsitySpec]] | None = None) -> dict[str, dict[str, float]]:
        """Results per density label; ``densities`` overrides the evaluator's own (e.g. a sweep),
        reusing the compiled step of every spec it has already seen."""
        densities = self.densities if densities is None else list(densities)
        totals: dict[str, dict[str, Array]] = {label: {} for label, _ in densities}
        for batch in batches:
            for label, spec in densities:
                sums = self._step(params, batch, spec)
                acc = totals[label]
                for key, value in sums.items():
                    acc[key] = acc[key] + value if key in acc else value
        results = {}
        for label, acc in jax.device_get(totals).items():
            count = float(acc.get("count", 0.0))
            if count == 0:
                raise ValueError("evaluation saw no valid example: is the eval split empty?")
            results[label] = {"top1": float(acc["correct"]) / count, "loss": float(acc["loss"]) / count,
                              "count": count}
            for key in acc:
                if key.startswith(("kept_", "capacity", "gmacs")):
                    results[label][key] = float(acc[key]) / count
            if "count_histogram" in acc:  # images per final patch-token count (a list, not a scalar)
                results[label]["count_histogram"] = [int(round(float(v))) for v in acc["count_histogram"]]
        return results
