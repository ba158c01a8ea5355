"""Dense DeiT on ImageNet-1k with the DeiT recipe (Touvron et al. 2021, Table 9 / main.py).

From scratch (the published recipe; DeiT-S reaches 79.8 % top-1 after 300 epochs at batch 1024):

    python -m saitjax.main --config configs/deit_small_imagenet.py --workdir gs://bucket/deit_s \
        --config.data.manual_dir=/data/imagenet_manual

Fine-tuning from converted timm weights (e.g. at another resolution, or to check the pipeline:
a converted DeiT-S evaluates at ~79.8 % with ``--mode eval`` after ``epochs=0.001``):

    python -m saitjax.tools.convert --src deit_small_patch16_224.safetensors --out deit_s.npz
    python -m saitjax.main --config configs/deit_small_imagenet.py:init=deit_s.npz,epochs=30,lr=1e-5 \
        --workdir /tmp/deit_s_ft

Arguments: model (deit_{tiny,small,base}_patch16_224), epochs, batch, lr (per 512 images), init,
data_dir, manual_dir. ImageNet preparation: docs/imagenet.md.
"""

from saitjax.config import base_config, finalize, imagenet_data, parse_arg


def get_config(arg: str | None = None):
    a = parse_arg(arg, model="deit_small_patch16_224", epochs=300.0, batch=1024, lr=5e-4, init="",
                  data_dir="", manual_dir="")
    c = base_config()
    c.model = a.model
    c.model_kwargs.num_classes = 1000
    c.model_kwargs.drop_path_rate = {"deit_tiny_patch16_224": 0.0}.get(a.model, 0.1)
    c.init = a.init

    imagenet_data(c, a.data_dir, a.manual_dir)

    c.batch_size = a.batch
    c.train_epochs = a.epochs
    c.optim.lr_per_512 = a.lr
    c.optim.min_lr = 1e-5
    c.optim.warmup_epochs = 5.0 if a.epochs >= 50 else 0.0
    c.optim.weight_decay = 0.05

    c.eval.every_steps = 5000
    c.checkpoint.every_steps = 1000
    return finalize(c)
