"""Every method side by side on the generated dataset, all from the same dense demo model.

    python experiments/compare_methods.py --workdir /tmp/saitjax_compare \
        --out experiments/results/compare_demo

1. trains the dense demo ViT (configs/demo_dense.py, ~6 min on 2 CPU cores);
2. from its weights, fine-tunes SaiT (dense/sparse steps, 3 epochs), DynamicViT (rho 0.7),
   AS-ViT (learned thresholds, budget 0.65), EViT (keep 0.7, fused) and ToMe (r = 8, merging
   in place), each with its demo config;
3. sweeps every model at its densities with the trainer's own sweep (exact top-1 on the 2000 test
   images, per-image ideal and executed GMACs, img/s at batch 1 and 32), ToMe also off the shelf
   (the dense weights merged without training);
4. writes ``compare.md`` (one table), ``compare.json`` and ``compare.png`` (top-1 vs executed
   GMACs and vs img/s, one line per method) to ``--out``.

Re-running resumes: finished trainings are not repeated. Each step is the same code path as
``python -m saitjax.main``; the README's comparison table was produced by this command.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def load_config(name: str, arg: str, sweep: tuple[str, ...]):
    """``configs/<name>.py`` at ``arg``, with the densities to sweep."""
    from saitjax.config import load_config_file

    config = load_config_file(os.path.join(ROOT, "configs", f"{name}.py"), arg)
    with config.unlocked():
        config.eval.sweep = sweep
        config.eval.sweep_batch_sizes = (1, 32)
    return config


def final_export(workdir: str) -> str:
    files = sorted(glob.glob(os.path.join(workdir, "export", "params_step*.npz")),
                   key=lambda p: int(p.rsplit("step", 1)[1].split(".")[0]))
    if not files:
        raise FileNotFoundError(f"no exported params in {workdir}/export: did the training finish?")
    return files[-1]


# (label, config, config argument with {init}, densities swept, train?)
PLAN = [
    ("SaiT", "demo", "init={init},epochs=3,warmup_epochs=0,lr=2e-4",
     ("dense", "mass:0.9", "mass:0.8", "mass:0.7", "mass:0.8,chunks=8", "topk:0.5"), True),
    ("DynamicViT", "dynamicvit_demo", "init={init}", ("topk:0.7@1/2/3",), True),
    ("AS-ViT", "asvit_demo", "init={init}", ("learned:1@1/2/3", "learned:1@1/2/3,chunks=8", "learned:1.25@1/2/3"),
     True),
    ("EViT", "evit_demo", "init={init}", ("evit:0.7", "evit:0.5"), True),
    ("ToMe (trained)", "tome_demo", "init={init}", ("tome:8", "tome:12"), True),
    ("ToMe (off the shelf)", "tome_demo", "init={init}", ("tome:4", "tome:8", "tome:12"), False),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="one sub-directory per method is trained here")
    parser.add_argument("--out", required=True, help="directory for compare.md/json/png")
    args = parser.parse_args(argv)

    from saitjax import train
    from saitjax.sweep import sweep_table
    from saitjax.viz import plot_pareto

    start = time.time()
    rows = []

    def run(label: str, name: str, arg: str, sweep: tuple[str, ...], trains: bool) -> None:
        workdir = os.path.join(args.workdir, label.split()[0].lower() + ("" if trains else "_offshelf"))
        config = load_config(name, arg, sweep)
        if trains:
            train.train_and_evaluate(config, workdir)
        for row in train.sweep_checkpoint(config, workdir):
            rows.append({"method": label, **row})
        print(f"[{time.time() - start:6.0f} s] {label}: done", flush=True)

    run("Dense", "demo_dense", "", ("dense",), True)
    init = final_export(os.path.join(args.workdir, "dense"))
    for label, name, arg, sweep, trains in PLAN:
        run(label, name, arg.format(init=init), sweep, trains)

    os.makedirs(args.out, exist_ok=True)
    dense = rows[0]
    for row in rows:
        row["top1_delta"] = row["top1"] - dense["top1"]
        row["gmacs_ratio"] = row["gmacs_executed"] / dense["gmacs_executed"]
        for bs in (1, 32):
            row[f"speedup_bs{bs}"] = row[f"img_per_s_bs{bs}"] / dense[f"img_per_s_bs{bs}"]
        row["spec"], row["density"] = row["density"], f"{row['method']}: {row['density']}"
    with open(os.path.join(args.out, "compare.json"), "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=2)
    table = sweep_table(rows, (1, 32))
    with open(os.path.join(args.out, "compare.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    plot_pareto([{**r, "img_per_s": r["img_per_s_bs32"]} for r in rows], os.path.join(args.out, "compare.png"),
                x="gmacs_executed", y="top1", label="spec", group="method",
                title="every method from one dense demo model (saitjax_shapes, 2000 test images)")
    print(table)
    print(f"wrote {args.out}/compare.{{md,json,png}} in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main())
