"""The embedded demo: SaiT on the generated `saitjax_shapes` dataset, start to finish on 2 CPU cores.

    python -m saitjax.main --config configs/demo.py --workdir /tmp/saitjax_demo

1. Generates the dataset on first use (no network; 10k 64x64 images of 8 shape classes over
   clutter, with object masks).
2. Dense warm-up: trains `sait_demo_patch8_64` (the dense demo ViT; SaiT adds no weights) from
   scratch with all tokens.
3. Dense/sparse fine-tuning: every step trains the dense pass and one sparse pass (tokens pruned
   before block 1 by the per-image `mass` rule, m sampled from `densities`), with in-place logit
   KD (dense pass -> sparse pass) and token-selection KD.
4. Density sweep of the final checkpoint: `sweep_step*/sweep.md` (top-1, kept tokens, GMACs,
   object/background patches kept, img/s at batch 1 and 32), `pareto.png`, `kept_tokens.png`.

Expected result (README, measured on a 2-core CPU): see the README's demo table.
Arguments (``configs/demo.py:epochs=10,warmup_epochs=7``): epochs, warmup_epochs, batch, lr,
data_dir, dataset, init (start from trained dense weights instead, e.g. the dense demo's
``export/params_step1560.npz`` with ``epochs=3,warmup_epochs=0``: SaiT fine-tuning).
"""

from saitjax.config import base_config, finalize, parse_arg, shapes_demo_recipe

SWEEP = ("dense", "mass:0.9", "mass:0.85", "mass:0.8", "mass:0.7", "topk:0.5")


def get_config(arg: str | None = None):
    a = parse_arg(arg, epochs=10.0, warmup_epochs=7.0, batch=64, lr=2e-3, data_dir="",
                  dataset="saitjax_shapes", init="")
    c = base_config()
    c.model = "sait_demo_patch8_64"
    c.model_kwargs.num_classes = 8
    c.model_kwargs.drop_path_rate = 0.0

    c.method = "sait"
    c.method_kwargs.locations = (1,)  # prune before block 1 of 4: three quarters of the blocks are sparse
    c.method_kwargs.densities = ("mass:0.7", "mass:0.8", "mass:0.9")
    c.method_kwargs.buckets = (0.25, 0.5, 0.75, 1.0)  # 16/32/48/64 tokens: 4 compiled branches
    c.method_kwargs.dense_warmup_epochs = a.warmup_epochs
    c.method_kwargs.distill_source = "dense_pass"  # in-place KD: no separate teacher in a from-scratch demo
    c.method_kwargs.distill_weight = 1.0
    c.method_kwargs.token_distill_weight = 1.0

    shapes_demo_recipe(c, a)
    c.init = a.init
    c.eval.every_steps = 800  # and at the end (and by --mode eval)
    c.eval.densities = ("dense", "mass:0.8")
    c.eval.keep_mask = True  # object masks: where do kept tokens fall?
    c.eval.sweep = SWEEP
    c.eval.sweep_batch_sizes = (1, 32)
    return finalize(c)


def get_sweep(hyper):
    """Three seeds of the demo, for its spread (README); about 30 min on 2 CPU cores:

    python -m saitjax.launch --config configs/demo.py --workdir /tmp/saitjax_demo_seeds
    """
    return hyper.sweep("config.seed", [0, 1, 2])
