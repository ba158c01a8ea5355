"""Density sweep: one checkpoint, every density, one table, a Pareto plot and kept-token pictures.

SaiT's promise is that one set of weights serves every density, switched at ``apply`` time. The
sweep checks it: for each density it measures top-1 on the whole eval split, the mean number of
kept tokens per stage, analytic GMACs at those mean counts, which fraction of object and of
background patches survive (when the data carries object masks), and measured img/s at batch 1
and at a serving batch (adaptive rules run in capacity buckets, so batch size matters). It writes
``sweep.json``, ``sweep.md``, ``pareto.png``, ``kept_tokens.png`` and, for per-image counts,
``kept_counts.png`` (a histogram of each image's final token count) into ``out_dir``; for
semantic tokens (STViT) ``semantic_attention_<T>at<L>.png`` (what each token looked at).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from saitjax.evaluate import Evaluator
from saitjax.flops import density_cost
from saitjax.models.core.variables import as_variables
from saitjax.run_results import standard_error
from saitjax.sparsity import SparsitySpec

Array = jax.Array


def local_numpy(batch: dict[str, Array]) -> dict[str, np.ndarray]:
    """This process's part of a global batch, on the host."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, jax.Array) and not value.is_fully_addressable:
            shards = sorted(value.addressable_shards, key=lambda s: s.index[0].start or 0)
            out[key] = np.concatenate([np.asarray(s.data) for s in shards])
        else:
            out[key] = np.asarray(value)
    return out


def forward_fn(model: Any, spec: SparsitySpec):
    """Jitted ``(params, images) -> (logits, final keep mask [B, N_p], source map [B, N_p])`` at ``spec``.

    Pruning methods report their last keep mask; merging/fusing methods show the patches that
    still have a token of their own (merged and fused patches are greyed).
    """

    def forward(params, images):
        logits, aux = model.apply(as_variables(params), images, sparsity=spec)
        masks = aux.get("keep_masks")
        source = aux.get("source")
        if source is None:  # a map model (Swin, ConvNeXt, their DynamicViT): no token provenance
            cells = (model.img_size // mask_cell(model)) ** 2
            source = jnp.broadcast_to(jnp.arange(cells), (images.shape[0], cells))
            if not masks:
                return logits, jnp.ones((images.shape[0], cells), jnp.float32), source
        if masks:
            return logits, masks[-1], source
        if "semantic_attention" in aux:  # STViT: every patch joined a semantic token
            return logits, (source >= 0).astype(jnp.float32), source
        # In-block methods (EViT, ToMe): a patch counts as kept while it still has a token of its own.
        own = jnp.take_along_axis(aux["token_size"], jnp.maximum(source, 0), axis=1) == 1
        return logits, ((source >= 0) & own).astype(jnp.float32), source

    return jax.jit(forward)


def mask_cell(model: Any) -> int:
    """Pixels per side of one cell of the model's keep masks (the patch, or a later stage's location)."""
    return getattr(model, "keep_mask_cell", model.patch_size)


def semantic_attention_fn(model: Any, spec: SparsitySpec):
    """Jitted ``(params, images) -> [B, T, N_p]``: STViT's semantic-token attention to the patches."""
    return jax.jit(lambda params, images: model.apply(as_variables(params), images, sparsity=spec)[1][
        "semantic_attention"][-1])


def measure_img_per_s(fn: Any, params: Any, images: np.ndarray, batch_size: int,
                      runs: int = 3) -> float:
    """Median img/s of ``fn`` over ``images`` in chunks of ``batch_size`` (compile excluded)."""
    n = (len(images) // batch_size) * batch_size
    if n == 0:
        return float("nan")
    chunks = [jax.device_put(images[i:i + batch_size]) for i in range(0, n, batch_size)]
    jax.block_until_ready(fn(params, chunks[0]))  # compile + warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        for chunk in chunks:
            jax.block_until_ready(fn(params, chunk))
        times.append(time.perf_counter() - start)
    return n / statistics.median(times)


def run_sweep(model: Any, params: Any, eval_batches: Iterable[dict[str, Array]],
              densities: Sequence[tuple[str, SparsitySpec]], out_dir: str, *,
              mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5),
              timing_batch_sizes: Sequence[int] = (1, 32), timing_images: int = 64,
              picture_images: int = 8, title: str | None = None,
              evaluator: Evaluator | None = None) -> list[dict[str, Any]]:
    """Evaluate ``params`` at every density and write the table and plots; returns the rows.

    ``evaluator``: an existing :class:`Evaluator` of ``model`` whose compiled steps are reused
    for the densities it already evaluates (a trainer's periodic evaluation).
    """
    from saitjax.viz import plot_count_histograms, plot_kept_tokens, plot_pareto, plot_semantic_attention

    batches = list(eval_batches)
    results = (evaluator or Evaluator(model, []))(params, batches, list(densities))
    sample = local_numpy(batches[0])
    valid = sample["valid"] > 0
    images = sample["image"][valid]
    rows = []
    chief = jax.process_index() == 0
    shown = images[:max(picture_images, max(timing_batch_sizes))]
    masks, sources = [], []
    for label, spec in densities:
        r = results[label]
        stages = len(spec.locations) if not spec.is_dense and not spec.in_block else 0
        fractions = [r.get(f"kept_fraction_s{s}", 1.0) for s in range(stages)]
        row = {"density": label, "top1": r["top1"], "loss": r["loss"], "count": r["count"],
               **density_cost(model, spec, r), "stage_kept_fractions": fractions}
        row["kept_tokens"] = row["kept_fraction"] * getattr(model, "routed_locations", model.num_patches)
        for key in ("kept_object", "kept_background", "capacity", "count_histogram"):
            if key in r:
                row[key] = r[key]
        fn = forward_fn(model, spec)  # one compilation per (density, batch size), shared below
        for bs in timing_batch_sizes:
            row[f"img_per_s_bs{bs}"] = measure_img_per_s(fn, params, images[:timing_images], bs)
        _, keep, source = fn(params, shown)
        masks.append(np.asarray(keep)[:picture_images])
        sources.append(np.asarray(source)[:picture_images] if spec.in_block or spec.rule == "semantic" else None)
        if spec.rule == "semantic" and chief:
            attention = semantic_attention_fn(model, spec)(params, shown[:picture_images])
            pixels = np.clip(shown[:picture_images] * np.asarray(std) + np.asarray(mean), 0.0, 1.0)
            os.makedirs(out_dir, exist_ok=True)
            plot_semantic_attention(pixels, np.asarray(attention), sources[-1], os.path.join(
                out_dir, f"semantic_attention_{spec.semantic_tokens}at{spec.locations[0]}.png"),
                patch_size=model.patch_size, title=f"what the semantic tokens attend to ({label})")
        rows.append(row)
    dense = next((row for row in rows if row["density"] == "dense"), rows[0])
    for row in rows:
        row["gmacs_ratio"] = row["gmacs_executed"] / dense["gmacs_executed"]
        row["top1_delta"] = row["top1"] - dense["top1"]
        for bs in timing_batch_sizes:
            row[f"speedup_bs{bs}"] = row[f"img_per_s_bs{bs}"] / dense[f"img_per_s_bs{bs}"]
    if not chief:  # every process evaluated (collectives); one writes
        return rows
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "sweep.json"), "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=2)
    with open(os.path.join(out_dir, "sweep.md"), "w", encoding="utf-8") as f:
        f.write(sweep_table(rows, timing_batch_sizes) + "\n")

    speed_key = f"img_per_s_bs{max(timing_batch_sizes)}"
    plot_pareto([{**row, "img_per_s": row[speed_key]} for row in rows], os.path.join(out_dir, "pareto.png"),
                x="gmacs_executed", y="top1", label="density", title=title or "accuracy vs compute, one checkpoint")
    if any("count_histogram" in row for row in rows):
        plot_count_histograms([row for row in rows if "count_histogram" in row], os.path.join(out_dir, "kept_counts.png"),
                              title=f"patch tokens kept per image ({len(batches)} eval batches)")
    pixels = np.clip(shown[:picture_images] * np.asarray(std) + np.asarray(mean), 0.0, 1.0)
    plot_kept_tokens(pixels, masks, [label for label, _ in densities],
                     os.path.join(out_dir, "kept_tokens.png"), patch_size=mask_cell(model),
                     max_images=picture_images, sources=sources)
    return rows


def sweep_table(rows: list[dict[str, Any]], timing_batch_sizes: Sequence[int] = (1, 32)) -> str:
    """Markdown table of a sweep (one row per density); top-1 with its standard error over the
    test images, which says which differences between rows are noise."""
    speed_cols = "".join(f" img/s bs{bs} (speedup) |" for bs in timing_batch_sizes)
    has_object = any("kept_object" in r for r in rows)
    header = ("| density | top-1 ± SE | Δ top-1 | kept tokens (mean) | GMACs ideal | GMACs executed | FLOP ratio (executed) |"
              + (" object kept | background kept |" if has_object else "") + speed_cols)
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        se = f" ± {100 * standard_error(r['top1'], r['count']):.2f}" if "count" in r else ""
        line = (f"| {r['density']} | {100 * r['top1']:.2f}{se} % | {100 * r['top1_delta']:+.2f} | "
                f"{r['kept_tokens']:.1f} | {r['gmacs']:.4f} | {r['gmacs_executed']:.4f} | {r['gmacs_ratio']:.3f} |")
        if has_object:
            obj, bg = r.get("kept_object"), r.get("kept_background")
            line += (f" {100 * obj:.1f} % | {100 * bg:.1f} % |" if obj is not None else " | |")
        for bs in timing_batch_sizes:
            line += f" {r[f'img_per_s_bs{bs}']:.0f} ({r[f'speedup_bs{bs}']:.2f}x) |"
        lines.append(line)
    return "\n".join(lines)
