"""ToMe demo: the dense demo ViT merged off the shelf, or fine-tuned with merging (2 CPU cores).

First train the dense model (about 6 minutes). Off the shelf (no training; ToMe's main use):

    python -m saitjax.main --config configs/demo_dense.py --workdir /tmp/demo_dense
    python -m saitjax.main --config configs/tome_demo.py:init=/tmp/demo_dense/export/params_step1560.npz \
        --workdir /tmp/tome_offshelf --mode sweep

(``--mode eval``/``sweep`` evaluate ``init`` when the workdir holds no checkpoint.) Trained
with merging in place (ToMe's released DeiT checkpoints were trained this way, r = 13, with
proportional attention), about 3 minutes:

    python -m saitjax.main --config configs/tome_demo.py:init=/tmp/demo_dense/export/params_step1560.npz \
        --workdir /tmp/tome_demo

`tome_demo_patch8_64` merges r = 8 of its 65 tokens in each of its 4 blocks (57 / 49 / 41 / 33
after them). Evaluated at "dense", "tome:4", "tome:8" and "tome:12".

Arguments: init (required), epochs, batch, lr, r, prop_attn, data_dir, dataset.
"""

from saitjax.config import base_config, finalize, parse_arg, shapes_finetune_recipe


def get_config(arg: str | None = None):
    a = parse_arg(arg, init="", epochs=3.0, batch=64, lr=2e-4, r=8, prop_attn=True, data_dir="",
                  dataset="saitjax_shapes")
    c = base_config()
    c.model = "tome_demo_patch8_64"
    c.model_kwargs.update(num_classes=8, drop_path_rate=0.0, r=a.r, prop_attn=a.prop_attn)
    c.method = "supervised"  # at the model's own r: merging is part of the forward pass

    shapes_finetune_recipe(c, a, "configs/tome_demo.py")
    c.eval.densities = ("dense", "tome:4", f"tome:{a.r}", "tome:12")
    c.eval.sweep = c.eval.densities
    return finalize(c)
