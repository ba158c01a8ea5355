"""Dense demo: the small ViT on the generated `saitjax_shapes` dataset, trained from scratch (2 CPU cores).

    python -m saitjax.main --config configs/demo_dense.py --workdir /tmp/saitjax_demo_dense

Generates the dataset on first use (no network; ~10k 64x64 images of 8 shape classes over
clutter), trains `vit_demo_patch8_64` from scratch, evaluates, and leaves checkpoints,
metrics.jsonl, TensorBoard events and training_curves.png in the workdir.
Expected result (README, measured on a 2-core CPU): see the README's demo table.

Arguments (``configs/demo_dense.py:epochs=2,batch=64``): epochs, batch, lr, data_dir, dataset.
"""

from saitjax.config import base_config, finalize, parse_arg, shapes_demo_data


def get_config(arg: str | None = None):
    a = parse_arg(arg, epochs=10.0, batch=64, lr=2e-3, data_dir="", dataset="saitjax_shapes")
    c = base_config()
    c.model = "vit_demo_patch8_64"
    c.model_kwargs.num_classes = 8
    c.model_kwargs.drop_path_rate = 0.0

    shapes_demo_data(c, a.dataset, a.data_dir)

    c.batch_size = a.batch
    c.train_epochs = a.epochs
    c.optim.lr = a.lr
    c.optim.min_lr = 1e-5
    c.optim.warmup_epochs = 0.5
    c.optim.weight_decay = 0.05
    c.optim.grad_clip_norm = 1.0

    c.eval.every_steps = 400  # and at the end (and by --mode eval)
    c.eval.batch_size = 256
    c.checkpoint.every_steps = 100
    c.log_every_steps = 20
    return finalize(c)
