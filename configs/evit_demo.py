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

from saitjax.config import base_config, finalize, parse_arg, shapes_demo_data

LOCATIONS = (1, 2, 3)


def get_config(arg: str | None = None):
    a = parse_arg(arg, init="", epochs=3.0, batch=64, lr=2e-4, keep=0.7, fuse=True, shrink_epochs=0.0,
                  data_dir="", dataset="saitjax_shapes")
    if not a.init:
        raise ValueError(
            "invalid config: configs/evit_demo.py fine-tunes a dense demo model; first run "
            "`python -m saitjax.main --config configs/demo_dense.py --workdir DIR` and pass "
            "init=DIR/export/params_step1560.npz (configs/evit_demo.py:init=...)")
    c = base_config()
    c.model = "evit_demo_patch8_64"
    c.model_kwargs.update(num_classes=8, drop_path_rate=0.0, keep_rate=a.keep, drop_loc=LOCATIONS,
                          fuse_token=a.fuse)
    c.init = a.init
    c.method = "evit"
    c.method_kwargs.update(shrink_start_epoch=0.0, shrink_epochs=a.shrink_epochs)

    shapes_demo_data(c, a.dataset, a.data_dir)
    c.batch_size = a.batch
    c.train_epochs = a.epochs
    c.optim.lr = a.lr
    c.optim.min_lr = 1e-6
    c.optim.warmup_epochs = 0.0
    c.optim.weight_decay = 0.05
    c.optim.grad_clip_norm = 1.0

    c.eval.densities = ("dense", f"evit:{a.keep:g}" + ("" if a.fuse else ",fuse=0"))
    c.eval.every_steps = 10_000  # at the end (and by --mode eval)
    c.eval.batch_size = 256
    c.checkpoint.every_steps = 100
    c.log_every_steps = 20
    return finalize(c)
