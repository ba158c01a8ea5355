"""Dense demo: the small ViT on the generated `saitjax_shapes` dataset, trained from scratch (2 CPU cores).

    python -m saitjax.main --config configs/demo_dense.py --workdir /tmp/saitjax_demo_dense

Generates the dataset on first use (no network; ~10k 64x64 images of 8 shape classes over
clutter), trains `vit_demo_patch8_64` from scratch, evaluates, and leaves checkpoints,
metrics.jsonl, TensorBoard events and training_curves.png in the workdir.
Expected result (README, measured on a 2-core CPU): see the README's demo table.

Arguments (``configs/demo_dense.py:epochs=2,batch=64``): epochs, batch, lr, data_dir, dataset.
"""

from saitjax.config import base_config, finalize, parse_arg, shapes_demo_recipe


def get_config(arg: str | None = None):
    a = parse_arg(arg, epochs=10.0, batch=64, lr=2e-3, data_dir="", dataset="saitjax_shapes")
    c = base_config()
    c.model = "vit_demo_patch8_64"
    c.model_kwargs.num_classes = 8
    c.model_kwargs.drop_path_rate = 0.0

    shapes_demo_recipe(c, a)
    return finalize(c)
