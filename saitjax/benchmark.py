"""Throughput benchmark: dense vs sparse (and saitjax vs timm PyTorch), measured in one run.

    python -m saitjax.benchmark --model deit_small_patch16_224 --batch-sizes 1,32 --keep 0.7 \
        --vs-timm --json results.jsonl
    python -m saitjax.benchmark --model stvitr_swin_small_patch4_window7_224 \
        --baseline swin_small_patch4_window7_224 --batch-sizes 1,32

``--baseline`` times another (dense) model first, so that a method that changes the architecture
(STViT-R against Swin) is compared with its backbone in the same run.

Protocol (design.md §5): inputs on device; compile first and report compile time apart;
warm-up calls; then ``--runs`` timed calls, each ending in ``block_until_ready`` and preceded
by an untimed call of the same variant (so it runs back to back, as in a loop), *interleaved*
across the compared variants so that drift of the machine affects all of them alike; the median
is reported. FLOPs two ways: analytic GMACs from the token schedule and XLA's count of the
compiled function. Ratios (sparse vs dense, saitjax vs timm) come from the same process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import saitjax
from saitjax.flops import analytic_gmacs, per_image_gmacs, xla_flops
from saitjax.sparsity import SparsityError, SparsitySpec, parse_density, parse_keep


def _environment() -> dict[str, Any]:
    device = jax.devices()[0]
    return {"device": getattr(device, "device_kind", str(device)), "backend": jax.default_backend(),
            "num_devices": jax.device_count(), "jax_version": jax.__version__,
            "cpu_count": os.cpu_count(), "python": platform.python_version(),
            # The allocator changes CPU timings by ~10 % (README "FLOPs and speed"): record it.
            "allocator_env": {k: v for k, v in sorted(os.environ.items())
                              if k.startswith("MALLOC_") or k in ("LD_PRELOAD", "XLA_FLAGS")}}


class Variant:
    """One compiled forward (a model at a spec, or a PyTorch reference) and its timings."""

    def __init__(self, label: str, call: Callable[[], Any], compile_s: float, gmacs: float,
                 gflops_xla: float, spec: str, framework: str = "saitjax", model: str | None = None):
        self.label, self.call, self.compile_s, self.model = label, call, compile_s, model
        self.gmacs, self.gflops_xla, self.spec, self.framework = gmacs, gflops_xla, spec, framework
        self.times: list[float] = []
        self.extra: dict[str, Any] = {}

    def time_once(self) -> None:
        self.times.append(time_back_to_back(self.call))


def time_back_to_back(call: Callable[[], Any]) -> float:
    """Seconds of one ``call()`` (until its arrays are ready) that follows an untimed one.

    The untimed call right before makes the timed one run back to back, as in a serving or
    training loop, with this variant's threads awake and the previous variant's (PyTorch's OpenMP
    pool, XLA's) done spinning. Without it, whichever framework follows the other pays for the
    other's spinning threads; with a pause instead, both pay for waking up (XLA more: DeiT-S bf16
    at batch 1 measured 37 ms back to back, 53 after 50 ms idle). Both benchmark CLIs time this way.
    """
    jax.block_until_ready(call())
    start = time.perf_counter()
    jax.block_until_ready(call())
    return time.perf_counter() - start


def saitjax_variant(model, variables, images, spec: SparsitySpec, name: str | None = None) -> Variant:
    """``variables``: every collection the model needs (``params``, BatchNorm ``batch_stats``)."""
    def forward(p, x):
        logits, aux = model.apply(p, x, sparsity=spec)
        return logits, aux.get("kept_counts", ()), aux.get("capacity")

    start = time.perf_counter()
    compiled = jax.jit(forward).lower(variables, images).compile()
    compile_s = time.perf_counter() - start
    gmacs = analytic_gmacs(model, spec) if not spec.is_adaptive else None
    extra: dict[str, Any] = {"gmacs_ideal": gmacs, "gmacs_executed": gmacs}
    if spec.is_adaptive:  # per-image counts: each image's ideal cost, and the capacity it ran in
        _, counts, capacity = compiled(variables, images)
        ideal = float(jnp.mean(per_image_gmacs(model, spec, counts)))
        executed = float(jnp.mean(per_image_gmacs(model, spec, [capacity] * len(counts))))
        gmacs = ideal
        extra = {"gmacs_ideal": ideal, "gmacs_executed": executed,
                 "kept_tokens_mean": float(jnp.mean(counts[-1])),
                 "kept_tokens_per_stage": [float(jnp.mean(c)) for c in counts],
                 "capacity_mean": float(jnp.mean(capacity)), "chunks": spec.chunks}
    variant = Variant(spec.describe(), lambda: jax.block_until_ready(compiled(variables, images)), compile_s,
                      gmacs, xla_flops(compiled) / images.shape[0] / 1e9, spec.describe(), model=name)
    variant.extra = extra
    return variant


def timm_variant(timm_name: str, images: np.ndarray, precision: str = "float32") -> Variant:
    """The same architecture in timm PyTorch, on the same inputs (NCHW), random weights.

    ``bfloat16``: PyTorch's own mixed precision (``torch.autocast``: bf16 matmuls, float32
    softmax/LayerNorm), the counterpart of saitjax's ``compute.precision=bfloat16``.
    """
    from saitjax.convert.timm_import import import_timm

    torch, timm = import_timm()
    torch.set_num_threads(os.cpu_count() or 1)
    model = timm.create_model(timm_name, pretrained=False).eval()
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    bf16 = precision == "bfloat16"

    def call():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model(x)

    start = time.perf_counter()
    call()  # first call (allocator warm-up) reported as "compile"
    return Variant("timm-pytorch", call, time.perf_counter() - start, float("nan"), float("nan"),
                   "dense", framework="timm-pytorch")


PRECISIONS = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _model_and_variables(name: str, params_path: str | None, seed: int,
                         precision: str = "float32") -> tuple[Any, Any]:
    """The model and its variables; in bfloat16 the floating-point parameters are cast once, as
    an inference deployment would (training keeps float32 masters, README "Pods")."""
    dtype = PRECISIONS[precision]
    model = saitjax.create_model(name, dtype=dtype)
    if params_path:
        variables = saitjax.load_variables(params_path, name)
    else:
        shape = (1, model.img_size, model.img_size, model.in_chans)
        variables = jax.jit(model.init)(jax.random.key(seed), jnp.zeros(shape))
    if dtype != jnp.float32:
        variables = jax.tree.map(
            lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, variables)
    return model, variables


def run(model_name: str, batch_sizes: list[int], specs: list[SparsitySpec], *, runs: int = 10,
        warmup: int = 2, vs_timm: bool = False, params_path: str | None = None, seed: int = 0,
        baseline: str | None = None, precision: str = "float32",
        log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Benchmark ``model_name`` at every batch size; one row per (batch size, variant).

    ``baseline``: a dense model timed first (random weights), the reference of every ratio.
    ``precision``: compute dtype of every variant, timm's included (``torch.autocast``).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r}: choose one of {sorted(PRECISIONS)}")
    model, variables = _model_and_variables(model_name, params_path, seed, precision)
    for spec in specs:
        spec.check_depth(model.depth)
    shape = (model.img_size, model.img_size, model.in_chans)
    reference = None
    if baseline:
        reference = _model_and_variables(baseline, None, seed, precision)
        if (reference[0].img_size, reference[0].in_chans) != (model.img_size, model.in_chans):
            raise ValueError(f"--baseline {baseline} takes {reference[0].img_size} px images, "
                             f"{model_name} {model.img_size} px: compare models of one input size")
    env = _environment()
    rows = []
    for batch in batch_sizes:
        images_np = np.random.default_rng(seed).normal(size=(batch,) + shape).astype(np.float32)
        images = jax.device_put(images_np)
        variants = [saitjax_variant(model, variables, images, s, model_name) for s in specs]
        if reference is not None:
            variants.insert(0, saitjax_variant(*reference, images, SparsitySpec.dense(), baseline))
        if vs_timm:
            timm_name = saitjax.model_entry(model_name).timm_name
            if timm_name is None:
                raise ValueError(f"{model_name} has no timm twin to compare with (--vs-timm)")
            variants.append(timm_variant(timm_name, images_np, precision))
        for v in variants:
            for _ in range(warmup):
                v.call()
        for _ in range(runs):
            for v in variants:
                v.time_once()
        base = variants[0]
        base_ms = statistics.median(base.times) * 1e3
        for v in variants:
            ms = statistics.median(v.times) * 1e3
            row = {"model": v.model or model_name, "framework": v.framework, "batch_size": batch, "spec": v.spec,
                   "img_per_s": batch / ms * 1e3, "ms_per_batch": ms, "compile_s": v.compile_s,
                   "gmacs_analytic": v.gmacs, "gflops_xla": v.gflops_xla,
                   "speedup_vs_first": base_ms / ms, "runs": runs, "precision": precision, **env}
            if v.framework == "saitjax":
                row["flop_ratio_vs_first"] = v.gmacs / base.gmacs
                row["executed_flop_ratio_vs_first"] = v.extra["gmacs_executed"] / base.gmacs
            row.update(v.extra)
            rows.append(row)
            log(_format_row(row))
    return rows


def _format_row(row: dict[str, Any]) -> str:
    flops = (f"{row['gmacs_analytic']:6.2f} GMACs  {row['gflops_xla']:6.2f} GFLOPs(XLA)"
             if row["framework"] == "saitjax" else f"{'':34s}")
    ratio = f"flop ratio {row['flop_ratio_vs_first']:.3f}" if "flop_ratio_vs_first" in row else ""
    if "capacity_mean" in row:
        ratio += (f" (executed {row['executed_flop_ratio_vs_first']:.3f})  kept {row['kept_tokens_mean']:.1f} "
                  f"tokens (mean), capacity {row['capacity_mean']:.1f} (mean, {row['chunks']} chunk(s))")
    return (f"{row['model'][:36]:36s} {row['framework']:12s} bs {row['batch_size']:3d}  {row['spec']:28s} "
            f"{row['img_per_s']:8.1f} img/s {row['ms_per_batch']:9.1f} ms  compile {row['compile_s']:5.1f} s  "
            f"{flops}  speedup {row['speedup_vs_first']:.2f}x  {ratio}")


def append_json_rows(path: str, rows: list[dict[str, Any]]) -> None:
    """Append one JSON object per row (results of several runs accumulate in one file)."""
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"appended {len(rows)} rows to {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m saitjax.benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="registered model name")
    parser.add_argument("--batch-sizes", default="1,32", help="comma-separated, e.g. 1,32")
    parser.add_argument("--keep", action="append", default=[],
                        help="sparse variant(s) to compare with dense: rho (0.7 = 0.7/0.49/0.343) or "
                             "explicit ratios 0.7,0.49,0.343; repeat the flag for several")
    parser.add_argument("--density", action="append", default=[],
                        help="sparse variant(s) as density strings, e.g. mass:0.9@3 (SaiT, per-image "
                             "counts in capacity buckets), value:1.0@3, topk:0.7@3/6/9, or 'default' (the "
                             "model's own schedule, e.g. DynamicViT-Swin's 0.7/0.5/0.3); repeatable")
    parser.add_argument("--locations", default="3,6,9", help="prune before these blocks (0-based)")
    parser.add_argument("--params", default=None, help="params .npz/.safetensors (default: random init)")
    parser.add_argument("--runs", type=int, default=10, help="timed calls per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--vs-timm", action="store_true", help="also time timm PyTorch (dense)")
    parser.add_argument("--baseline", default=None,
                        help="another registered model timed first, dense, as the reference of the "
                             "ratios (e.g. swin_small_patch4_window7_224 for STViT-R-Swin-S)")
    parser.add_argument("--precision", default="float32", choices=sorted(PRECISIONS),
                        help="compute dtype of every variant; bfloat16 casts saitjax's parameters once "
                             "and runs timm under torch.autocast")
    parser.add_argument("--json", default=None, help="append one JSON object per row to this file")
    args = parser.parse_args(argv)
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
        if not batch_sizes or min(batch_sizes) < 1:
            raise ValueError(f"--batch-sizes must be positive integers, got {args.batch_sizes!r}")
        locations = tuple(int(l) for l in args.locations.split(","))
        specs = ([SparsitySpec.dense()] + [parse_keep(k, locations) for k in args.keep]
                 + [saitjax.create_model(args.model).default_sparsity() if d.strip() == "default"
                    else parse_density(d, locations) for d in args.density])
        print(f"saitjax benchmark: {args.model}, batch sizes {batch_sizes}, {args.runs} runs, "
              f"{args.precision}; "
              f"{_environment()}")
        rows = run(args.model, batch_sizes, specs, runs=args.runs, warmup=args.warmup,
                   vs_timm=args.vs_timm, params_path=args.params, baseline=args.baseline,
                   precision=args.precision)
    except (SparsityError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        append_json_rows(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
