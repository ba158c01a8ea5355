"""Dense demo: the small ViT on the generated `saitjax_shapes` dataset, trained from scratch (2 CPU cores).

    python -m saitjax.main --config configs/demo_dense.py --workdir /tmp/saitjax_demo_dense

Generates the dataset on first use (no network; ~10k 64x64 images of 8 shape classes over
clutter), trains `vit_demo_patch8_64` from scratch, evaluates, and leaves checkpoints,
metrics.jsonl, TensorBoard events and training_curves.png in the workdir.
Expected result (README, measured on a 2-core CPU): see the README's demo table.

Arguments (``configs/demo_dense.py:epochs=2,batch=64``): model (``vit_demo_patch8_64``, or
``swin_demo_patch2_window4_64`` for the dense model of configs/dynamicvit_spatial_demo.py), epochs, batch, lr,
data_dir, dataset.
"""

from saitjax.config import base_config, finalize, parse_arg, shapes_demo_recipe

DEMO_MODELS = ("vit_demo_patch8_64", "swin_demo_patch2_window4_64")


def get_config(arg: str | None = None):
    a = parse_arg(arg, model="vit_demo_patch8_64", epochs=10.0, batch=64, lr=2e-3, data_dir="",
                  dataset="saitjax_shapes")
    if a.model not in DEMO_MODELS:
        raise ValueError(f"invalid config: model={a.model!r}; the dense demos are {DEMO_MODELS}")
    c = base_config()
    c.model = a.model
    c.model_kwargs.num_classes = 8
    c.model_kwargs.drop_path_rate = 0.0

    shapes_demo_recipe(c, a)
    return finalize(c)
