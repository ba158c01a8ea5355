"""STViT-R on Swin, ImageNet-1k from scratch: the recipe of the official logs (log/small.txt, base.txt).

    python -m saitjax.main --config configs/stvitr_swin_imagenet.py:model=small \
        --workdir /ckpt/stvitr_s --config.data.manual_dir=/data/imagenet_manual

Published: STViT-R-Swin-S 82.7 % top-1 (log max 82.65) at 5.83 GFLOPs (fvcore; saitjax counts
5.80 GMACs + norms = 5.826), STViT-R-Swin-B 83.2 % at 10.26; dense Swin-S / B 83.0 / 83.5 at
8.7 / 15.4. Released checkpoints (Hugging Face csncsn/STViT-R) convert with
``python -m saitjax.tools.convert --src STViT-R-Swin-S.pth --model stvitr_swin_small_patch4_window7_224``.

Recipe (config.py + logs): 300 epochs at batch 1024 (64 x 16 GPUs), AdamW (0.9, 0.999), lr 5e-4
per 512 (1e-3 at 1024), 20 warm-up epochs, cosine to 1e-5, weight decay 0.05, gradient clipping
at 5, label smoothing 0.1, RandAugment rand-m9-mstd0.5-inc1, mixup 0.8 / cutmix 1.0, drop-path 0.2 (T) /
0.3 (S) / 0.4 (B); cross-entropy only. Not reproduced: random erasing 0.25, the warm-up's start
at 1e-6 (here 0), AMP (fp32 here). The stem's BatchNorm statistics train as ``batch_stats``.

Arguments: model (tiny/small/base), tokens_per_window (3: 9 per window as released; 4: the
paper's 16), batch (1024), epochs (300), data_dir, manual_dir.
"""

from saitjax.config import base_config, finalize, imagenet_data, parse_arg

DROP_PATH = {"tiny": 0.2, "small": 0.3, "base": 0.4}


def get_config(arg: str | None = None):
    a = parse_arg(arg, model="small", tokens_per_window=3, batch=1024, epochs=300.0, data_dir="", manual_dir="")
    if a.model not in DROP_PATH:
        raise ValueError(f"invalid config: model={a.model!r}; choose one of {tuple(DROP_PATH)}")
    c = base_config()
    c.model = f"stvitr_swin_{a.model}_patch4_window7_224"
    c.model_kwargs.update(num_classes=1000, drop_path_rate=DROP_PATH[a.model],
                          sample_window_size=a.tokens_per_window)
    c.method = "supervised"

    imagenet_data(c, a.data_dir, a.manual_dir)
    c.batch_size = a.batch
    c.train_epochs = a.epochs
    c.optim.lr_per_512 = 5e-4
    c.optim.min_lr = 1e-5
    c.optim.warmup_epochs = 20.0
    c.optim.weight_decay = 0.05
    c.optim.grad_clip_norm = 5.0

    c.eval.every_steps = 2500
    c.checkpoint.every_steps = 1000
    return finalize(c)
