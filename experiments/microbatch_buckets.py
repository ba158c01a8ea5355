"""Sorted micro-batch bucketing: executed vs ideal FLOPs and speed, one run, several chunk counts.

    python experiments/microbatch_buckets.py --model sait_deit_small_patch16_224 --density mass:0.7@3 \
        --batch 32 --chunks 1,2,4,8 --sharpen 3 --json experiments/results/microbatch_small_cpu.json

An adaptive rule gives every image its own token count; a batch runs in capacity buckets. With one
chunk the whole batch pays for its largest image; sorted into ``c`` equal chunks, each chunk pays
for its own largest. This script times dense and the adaptive density at every chunk count,
interleaved in one process (median of ``--runs``), and reports per image: the ideal GMACs (its own
count), the executed GMACs (the capacity it ran in) and their ratio.

Random weights give nearly uniform attention and hence nearly equal counts, which would hide the
effect. So the inputs are synthetic "objects": a square of random size (5-90 % of the image) and
strong texture over faint noise, and ``--sharpen S`` multiplies the qkv weights by S so that the
CLS attention concentrates; per-image counts then spread out as a trained model's do (the
count distribution is printed so the spread can be judged). ``--params`` times real weights.
``--buckets`` sets the capacity fractions (default: the library's 25/37.5/50/62.5/75/100 %).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np


def object_images(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Faint noise plus one textured square per image covering 5-90 % of it."""
    images = rng.normal(size=shape).astype(np.float32) * 0.3
    size = shape[1]
    for image in images:
        side = int(size * np.sqrt(rng.uniform(0.05, 0.9)))
        y, x = rng.integers(0, size - side + 1, size=2)
        image[y:y + side, x:x + side] += rng.normal(size=(side, side, shape[3])) * 2.0 + 1.0
    return images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sait_deit_small_patch16_224")
    parser.add_argument("--density", default="mass:0.7@3")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--chunks", default="1,2,4,8")
    parser.add_argument("--sharpen", type=float, default=4.0, help="scale of the qkv kernels (random weights)")
    parser.add_argument("--buckets", default="", help="capacity fractions, e.g. 0.125,0.25,...,1")
    parser.add_argument("--params", default=None, help="params file (default: random init, sharpened)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    import saitjax
    from saitjax.flops import analytic_gmacs, per_image_gmacs

    model = saitjax.create_model(args.model)
    shape = (args.batch, model.img_size, model.img_size, model.in_chans)
    images = jnp.asarray(object_images(shape, np.random.default_rng(args.seed)))
    if args.params:
        params = saitjax.load_params(args.params, args.model)
    else:
        params = jax.jit(model.init)(jax.random.key(args.seed), images[:1])["params"]
        params = jax.tree_util.tree_map_with_path(
            lambda path, v: v * args.sharpen if "qkv" in jax.tree_util.keystr(path)
            and "kernel" in jax.tree_util.keystr(path) else v, params)

    bucket_kw = {"buckets": tuple(float(b) for b in args.buckets.split(","))} if args.buckets else {}
    base = saitjax.parse_density(args.density, **bucket_kw)
    variants = [("dense", saitjax.SparsitySpec.dense())]
    variants += [(f"{args.density} chunks={c}", base.with_chunks(int(c))) for c in args.chunks.split(",")]
    calls, rows = [], []
    for label, spec in variants:
        fn = jax.jit(lambda p, x, spec=spec: model.apply({"params": p}, x, sparsity=spec))
        _, aux = jax.block_until_ready(fn(params, images))  # compile + warm-up
        row = {"variant": label, "spec": spec.describe(), "batch": args.batch}
        if spec.is_dense:
            row.update(gmacs_ideal=analytic_gmacs(model, spec), gmacs_executed=analytic_gmacs(model, spec))
        else:
            counts = aux["kept_counts"]
            ideal = per_image_gmacs(model, spec, counts)
            executed = per_image_gmacs(model, spec, [aux["capacity"]] * len(counts))
            c = np.asarray(counts[0])
            row.update(gmacs_ideal=float(jnp.mean(ideal)), gmacs_executed=float(jnp.mean(executed)),
                       counts_min=int(c.min()), counts_mean=float(c.mean()), counts_max=int(c.max()),
                       counts_std=float(c.std()), capacities=sorted(set(np.asarray(aux["capacity"]).tolist())))
        row["executed_over_ideal"] = row["gmacs_executed"] / row["gmacs_ideal"]
        rows.append(row)
        calls.append(lambda fn=fn: jax.block_until_ready(fn(params, images)))
    times = [[] for _ in calls]
    for _ in range(args.runs):
        for i, call in enumerate(calls):
            start = time.perf_counter()
            call()
            times[i].append(time.perf_counter() - start)
    dense_ms = statistics.median(times[0]) * 1e3
    one_chunk_ms = statistics.median(times[1]) * 1e3
    dense_gmacs = rows[0]["gmacs_ideal"]
    for row, t in zip(rows, times):
        ms = statistics.median(t) * 1e3
        row.update(ms_per_batch=ms, img_per_s=args.batch / ms * 1e3, speedup_vs_dense=dense_ms / ms,
                   speedup_vs_one_chunk=one_chunk_ms / ms, ideal_speedup=dense_gmacs / row["gmacs_ideal"],
                   executed_flop_ratio=row["gmacs_executed"] / dense_gmacs, runs=args.runs,
                   device=jax.devices()[0].device_kind, jax_version=jax.__version__)
    print(f"{args.model} at batch {args.batch}; counts after the first location: "
          + ", ".join(f"{k}={rows[1][k]:.1f}" for k in ("counts_min", "counts_mean", "counts_max", "counts_std")))
    print("| variant | GMACs ideal | GMACs executed | executed / ideal | capacities run | img/s | speedup vs dense "
          "| vs 1 chunk |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['gmacs_ideal']:.2f} | {r['gmacs_executed']:.2f} | {r['executed_over_ideal']:.3f} | "
              f"{r.get('capacities', '')} | {r['img_per_s']:.1f} | {r['speedup_vs_dense']:.2f}x | "
              f"{r['speedup_vs_one_chunk']:.2f}x |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
