"""XLA:CPU against PyTorch (oneDNN/MKL) on the matrix products of DeiT-S, one process, interleaved.

Why dense saitjax trails timm on some CPUs, and why a block on 17 tokens costs more than its FLOPs:

    python experiments/cpu_gemm_vs_torch.py --json experiments/results/cpu_gemm_vs_torch.jsonl

Each row times ``x[M, K] @ w[K, N]`` for M = tokens in a batch (17: STViT's semantic tokens at
batch 1; 197: one image; 1576 / 6304: batch 8 / 32), K, N the shapes of DeiT-S's qkv, fc1 and fc2,
in float32 and in bfloat16 (XLA: bf16 operands accumulating into float32, as
``saitjax.models.core.precision`` runs them; PyTorch: bf16 operands and result, as under
``torch.autocast``). One call multiplies by eight different weight matrices, as eight blocks do
(so weights come from the cache level they would in a model, and the dispatch is amortised); the
median of ``--runs`` calls, each preceded by an untimed one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from saitjax.benchmark import time_back_to_back

CHAIN = 8
SHAPES = [(384, 1152), (384, 1536), (1536, 384)]  # qkv, fc1, fc2 of DeiT-S
ROWS = [17, 197, 1576, 6304]


def _time(call, runs: int) -> float:
    """Median seconds of ``runs`` back-to-back calls, timed as the benchmark CLIs time."""
    return statistics.median(time_back_to_back(call) for _ in range(runs))


def measure(m: int, k: int, n: int, dtype: str, runs: int) -> dict:
    import torch

    rng = np.random.default_rng(0)
    x = rng.normal(size=(m, k)).astype(np.float32)
    w = rng.normal(size=(CHAIN, k, n)).astype(np.float32) / k

    if dtype == "float32":
        def product(a, b):
            return a @ b
        jx, jw = jnp.asarray(x), jnp.asarray(w)
        tx, tw = torch.from_numpy(x), torch.from_numpy(w)
    else:
        def product(a, b):
            return jax.lax.dot(a, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16)
        jx, jw = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
        tx, tw = torch.from_numpy(x).bfloat16(), torch.from_numpy(w).bfloat16()

    @jax.jit
    def chain(a, b):
        return [product(a, b[i]) for i in range(CHAIN)]  # all returned: XLA can't drop any work

    def torch_chain():
        with torch.inference_mode():
            return [tx @ tw[i] for i in range(CHAIN)]

    jax.block_until_ready(chain(jx, jw))
    t_jax = _time(lambda: chain(jx, jw), runs) / CHAIN
    t_torch = _time(torch_chain, runs) / CHAIN
    flops = 2 * m * k * n
    return {"m": m, "k": k, "n": n, "dtype": dtype, "xla_gflops": flops / t_jax / 1e9,
            "torch_gflops": flops / t_torch / 1e9, "xla_vs_torch_speed": t_torch / t_jax,
            "us_per_row_xla": t_jax / m * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--json", default=None, help="append one JSON row per shape")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    env = {"jax": jax.__version__, "torch": torch.__version__, "cpu_count": os.cpu_count(),
           "machine": platform.processor() or platform.machine()}
    rows = []
    for dtype in args.dtypes.split(","):
        for m in ROWS:
            for k, n in SHAPES:
                row = {**measure(m, k, n, dtype, args.runs), **env}
                rows.append(row)
                print(f"{dtype:8s} [{m:5d}, {k:4d}] x [{k:4d}, {n:4d}]  XLA {row['xla_gflops']:7.1f} GFLOP/s  "
                      f"PyTorch {row['torch_gflops']:7.1f}  XLA/PyTorch speed {row['xla_vs_torch_speed']:.2f}  "
                      f"XLA {row['us_per_row_xla']:.2f} us/row", flush=True)
    if args.json:
        with open(args.json, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
