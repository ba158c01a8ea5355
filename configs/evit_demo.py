"""EViT demo: fine-tune the dense demo ViT into `evit_demo_patch8_64` (2 CPU cores, ~3 minutes).

First train the dense model (about 6 minutes), then fine-tune it with EViT keeping 70 % of the
current patch tokens inside blocks 1, 2, 3 and fusing the rest (MLP tokens 46 / 34 / 25 of 65):

    python -m saitjax.main --config configs/demo_dense.py --workdir /tmp/demo_dense
    python -m saitjax.main --config configs/evit_demo.py:init=/tmp/demo_dense/export/params_step1560.npz \
        --workdir /tmp/evit_demo

The official fine-tuning recipe in miniature: constant keep rate from the first step
(``shrink_start_epoch=0``, the fix of the official issue #3), no extra loss, a small learning
rate. ``shrink_epochs=E`` instead lowers the rate along the official cosine (quantised: at most 7
compilations from 1 to 0.7). Evaluated at "dense" and at the trained "evit:0.7".

Arguments: init (required), epochs, batch, lr, keep, fuse, shrink_epochs, data_dir, dataset.
"""

from saitjax.config import base_config, finalize, parse_arg, shapes_finetune_recipe

LOCATIONS = (1, 2, 3)


def get_config(arg: str | None = None):
    a = parse_arg(arg, init="", epochs=3.0, batch=64, lr=2e-4, keep=0.7, fuse=True, shrink_epochs=0.0,
                  data_dir="", dataset="saitjax_shapes")
    c = base_config()
    c.model = "evit_demo_patch8_64"
    c.model_kwargs.update(num_classes=8, drop_path_rate=0.0, keep_rate=a.keep, drop_loc=LOCATIONS,
                          fuse_token=a.fuse)
    c.method = "evit"
    c.method_kwargs.update(shrink_start_epoch=0.0, shrink_epochs=a.shrink_epochs)

    shapes_finetune_recipe(c, a, "configs/evit_demo.py")
    c.eval.densities = ("dense", f"evit:{a.keep:g}" + ("" if a.fuse else ",fuse=0"))
    return finalize(c)
