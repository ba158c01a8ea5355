"""Render `python -m saitjax.benchmark --json` rows as the README's markdown table.

Ideal GMACs are each image at its own token count; executed GMACs are the capacity that ran
(a bucket for per-image counts). Both equal the analytic count for fixed-count densities.

    python experiments/benchmark_table.py experiments/results/deit_small_cpu.jsonl
"""

from __future__ import annotations

import json
import sys


def _num(value: float | None) -> str:
    """Two decimals; empty for rows without FLOPs (timm rows carry NaN/None)."""
    return "" if value is None or value != value else f"{value:.2f}"


def table(rows: list[dict]) -> str:
    lines = ["| model | framework | batch | tokens kept | img/s | ms/batch | speedup (measured) | "
             "FLOP ratio | GMACs ideal | GMACs executed | GFLOPs (XLA) | compile s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r.get("flop_ratio_vs_first")
        gmacs = r.get("gmacs_ideal", r["gmacs_analytic"])
        executed = r.get("gmacs_executed", gmacs)
        lines.append(
            f"| {r['model']} | {r['framework']} | {r['batch_size']} | {r['spec']} | {r['img_per_s']:.1f} | "
            f"{r['ms_per_batch']:.1f} | {r['speedup_vs_first']:.2f}x | "
            f"{'' if ratio is None else f'{ratio:.3f}'} | {_num(gmacs)} | {_num(executed)} | "
            f"{'' if r['gflops_xla'] != r['gflops_xla'] else format(r['gflops_xla'], '.2f')} | "
            f"{r['compile_s']:.1f} |")
    first = rows[0] if rows else {}
    lines.append(f"\nMachine: {first.get('device')} ({first.get('cpu_count')} cores), "
                 f"jax {first.get('jax_version')}, {first.get('runs')} timed runs per row (median).")
    return "\n".join(lines)


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as f:
        print(table([json.loads(line) for line in f if line.strip()]))
