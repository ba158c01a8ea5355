"""Memory and throughput of the training and evaluation steps across compute options, one run.

    python -m saitjax.benchmark_memory --model deit_base_patch16_224 --img-sizes 224,384 \
        --batch-size 8 --precision float32,bfloat16 --remat none,full --attention explicit,fused \
        --json results.jsonl

Every combination of resolution x precision x remat x attention is compiled for the real training
step (the trainer's AdamW update with mixup, clipping and the dense method's loss) and for the
evaluation forward. Peak memory is read from the compiled executable's memory analysis
(arguments + outputs + temporaries - donated aliases: what the device must hold at once), so it
needs no accelerator to be measured. With ``--runs > 0`` each step is also timed the way
``saitjax.benchmark`` times (back to back, interleaved across the variants of one resolution);
ratios are to the first variant of that resolution.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import saitjax
from saitjax.benchmark import _environment, append_json_rows, time_back_to_back
from saitjax.checkpointing import TrainState
from saitjax.config import PRECISIONS, base_config
from saitjax.methods import build_method
from saitjax.optim import OptimizerConfig, make_optimizer
from saitjax.train import make_train_step

MiB = 2 ** 20


def memory_of(compiled: Any) -> dict[str, float]:
    """MiB of a compiled executable: peak (what must be resident at once) and its parts."""
    m = compiled.memory_analysis()
    if m is None:  # a backend without the analysis
        return {}
    peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return {"peak_mib": peak / MiB, "temp_mib": m.temp_size_in_bytes / MiB,
            "argument_mib": m.argument_size_in_bytes / MiB, "output_mib": m.output_size_in_bytes / MiB}


class StepVariant:
    """One compiled step (train or eval) of one model configuration, and its timings."""

    def __init__(self, fields: dict[str, Any], call: Callable[[], Any], compiled: Any, compile_s: float):
        self.fields, self.call, self.compile_s = fields, call, compile_s
        self.memory = memory_of(compiled)
        self.times: list[float] = []

    def time_once(self) -> None:
        self.times.append(time_back_to_back(self.call))


def _train_variant(model: Any, batch_size: int, fields: dict[str, Any], seed: int) -> StepVariant:
    config = base_config()
    config.model = fields["model"]
    method = build_method(config, model)
    images = jnp.asarray(np.random.default_rng(seed).normal(
        size=(batch_size, model.img_size, model.img_size, model.in_chans)).astype(np.float32))
    batch = {"image": images, "label": jnp.arange(batch_size, dtype=jnp.int32) % model.num_classes}
    params = jax.jit(model.init)(jax.random.key(seed), images[:1])["params"]
    tx, schedule = make_optimizer(OptimizerConfig(lr=1e-3, total_steps=1000, warmup_steps=10), params)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), model_state={})
    step = jax.jit(make_train_step(method, tx, schedule, config, model.num_classes), static_argnums=3,
                   donate_argnums=0)
    start = time.perf_counter()
    compiled = step.lower(state, batch, None, method.train_sparsity(0)).compile()
    compile_s = time.perf_counter() - start
    holder = {"state": state}

    def call():
        holder["state"], metrics = compiled(holder["state"], batch, None)
        return metrics["loss"]

    return StepVariant(fields, call, compiled, compile_s)


def _eval_variant(model: Any, batch_size: int, fields: dict[str, Any], seed: int) -> StepVariant:
    images = jnp.asarray(np.random.default_rng(seed).normal(
        size=(batch_size, model.img_size, model.img_size, model.in_chans)).astype(np.float32))
    variables = jax.jit(model.init)(jax.random.key(seed), images[:1])
    forward = jax.jit(lambda v, x: model.apply(v, x)[0])
    start = time.perf_counter()
    compiled = forward.lower(variables, images).compile()
    compile_s = time.perf_counter() - start
    return StepVariant(fields, lambda: compiled(variables, images), compiled, compile_s)


def run(model_name: str, img_sizes: list[int], batch_size: int, precisions: list[str], remats: list[str],
        attentions: list[str], steps: list[str], *, runs: int = 3, seed: int = 0,
        log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """One row per (resolution, step, precision, remat, attention)."""
    env = _environment()
    rows = []
    for img_size in img_sizes:
        variants = []
        for kind, precision, remat, attention in itertools.product(steps, precisions, remats, attentions):
            if kind == "eval" and remat != remats[0]:
                continue  # no backward pass: remat changes nothing
            model = saitjax.create_model(model_name, img_size=img_size, dtype=PRECISIONS[precision],
                                         remat=remat, attention=attention)
            fields = {"model": model_name, "img_size": img_size, "step": kind, "batch_size": batch_size,
                      "precision": precision, "remat": remat if kind == "train" else "n/a", "attention": attention}
            make = _train_variant if kind == "train" else _eval_variant
            variants.append(make(model, batch_size, fields, seed))
        for v in variants:
            v.call()  # warm-up
        for _ in range(runs):
            for v in variants:
                v.time_once()
        first = {}
        for v in variants:
            row = {**v.fields, **v.memory, "compile_s": v.compile_s, "runs": runs, **env}
            if runs:
                ms = statistics.median(v.times) * 1e3
                row.update(ms_per_step=ms, img_per_s=batch_size / ms * 1e3)
            base = first.setdefault(v.fields["step"], row)
            if "peak_mib" in row:
                row["peak_ratio_vs_first"] = row["peak_mib"] / base["peak_mib"]
            if runs:
                row["speed_ratio_vs_first"] = base["ms_per_step"] / row["ms_per_step"]
            rows.append(row)
            log(_format_row(row))
    return rows


def _format_row(row: dict[str, Any]) -> str:
    memory = f"peak {row['peak_mib']:9.1f} MiB ({row['peak_ratio_vs_first']:.2f}x)" if "peak_mib" in row else ""
    speed = (f"{row['img_per_s']:7.2f} img/s ({row['speed_ratio_vs_first']:.2f}x)" if "img_per_s" in row else "")
    return (f"{row['model'][:28]:28s} {row['img_size']:4d} px {row['step']:5s} bs {row['batch_size']:3d} "
            f"{row['precision']:8s} remat {row['remat']:16s} {row['attention']:8s} {memory}  {speed}  "
            f"compile {row['compile_s']:5.1f} s")


def _choices(text: str, allowed: tuple[str, ...] | None, flag: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if allowed is not None and v not in allowed]
    if not values or bad:
        raise ValueError(f"{flag} {text!r}: choose from {', '.join(allowed or ())}")
    return values


def main(argv: list[str] | None = None) -> int:
    from saitjax.models.core.attention import ATTENTION_IMPLS
    from saitjax.models.core.remat import check_remat

    parser = argparse.ArgumentParser(prog="python -m saitjax.benchmark_memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a registered ViT-family model")
    parser.add_argument("--img-sizes", default="224", help="comma-separated resolutions, e.g. 224,384,512")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--precision", default="float32", help="float32,bfloat16")
    parser.add_argument("--remat", default="none", help="none,full or jax.checkpoint_policies names")
    parser.add_argument("--attention", default="explicit", help="explicit,fused,auto")
    parser.add_argument("--steps", default="train,eval", help="train,eval")
    parser.add_argument("--runs", type=int, default=3, help="timed steps per variant (0: memory only)")
    parser.add_argument("--json", default=None, help="append one JSON object per row to this file")
    args = parser.parse_args(argv)
    try:
        sizes = [int(s) for s in args.img_sizes.split(",") if s.strip()]
        if not sizes or min(sizes) < 1 or args.batch_size < 1 or args.runs < 0:
            raise ValueError("--img-sizes and --batch-size must be positive, --runs >= 0")
        remats = _choices(args.remat, None, "--remat")
        for r in remats:
            check_remat(r)
        rows = run(args.model, sizes, args.batch_size, _choices(args.precision, tuple(PRECISIONS), "--precision"),
                   remats, _choices(args.attention, ATTENTION_IMPLS, "--attention"),
                   _choices(args.steps, ("train", "eval"), "--steps"), runs=args.runs)
    except (ValueError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        append_json_rows(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
