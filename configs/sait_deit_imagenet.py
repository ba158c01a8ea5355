"""SaiT dense/sparse fine-tuning of a pretrained DeiT on ImageNet-1k (saitjax's recipe).

The SaiT paper's body and code are not public (methods.md §2), so this recipe is saitjax's own
reading of the abstract, with every choice a config field:

    python -m saitjax.tools.convert --src deit_small_patch16_224.safetensors --out deit_s.npz
    python -m saitjax.main --config configs/sait_deit_imagenet.py:size=small,init=deit_s.npz \
        --workdir /ckpt/sait_s --config.data.manual_dir=/data/imagenet_manual
    python -m saitjax.main --config configs/sait_deit_imagenet.py:size=small,init=deit_s.npz \
        --workdir /ckpt/sait_s --mode sweep     # table, Pareto plot, kept-token pictures

* Model: ``sait_deit_{size}_patch16_224`` (the DeiT weights unchanged; no new parameters).
* Pruning before block 3 (0-based) by the per-image ``mass`` rule on head-mean CLS attention,
  counts clamped to [10 %, 100 %] of the 196 patches; buckets 25/37.5/50/62.5/75/100 %.
* Each step: dense pass + one sparse pass at m sampled from {0.8, 0.85, 0.9, 0.95}.
* Distillation: logit KD (weight 1) from the frozen initial DeiT (``teacher="init"``) to both
  passes; token-selection KD (weight 1) from the dense pass's last-layer CLS attention.
* Optimiser: AdamW, lr 5e-5 per 512 images (fine-tuning), wd 0.05, 1 warm-up epoch, cosine to
  1e-6, 30 epochs, batch 1024; DeiT augmentation (RandAugment, mixup 0.8, cutmix 1.0, ls 0.1).
* Expected result: not measured (no ImageNet run was possible on this project's machines); the
  published SaiT claim is < 0.5 % top-1 loss at 39-43 % fewer FLOPs. Zero loss at ``dense`` holds
  by construction (bit-identical logits, tested).

Arguments: size (tiny/small/base), init (converted dense DeiT params; required), epochs, batch,
lr (per 512 images), mass (comma-free list as ``0.8/0.85/0.9/0.95``), data_dir, manual_dir.
"""

from saitjax.config import base_config, finalize, imagenet_data, parse_arg

SWEEP = ("dense", "mass:0.95", "mass:0.9", "mass:0.85", "mass:0.8", "mass:0.75", "topk:0.7", "topk:0.5")


def get_config(arg: str | None = None):
    a = parse_arg(arg, size="small", init="", epochs=30.0, batch=1024, lr=5e-5,
                  mass="0.8/0.85/0.9/0.95", data_dir="", manual_dir="")
    if a.size not in ("tiny", "small", "base"):
        raise ValueError(f"config argument size={a.size!r}: choose tiny, small or base")
    if not a.init:
        raise ValueError("config argument init is empty: SaiT fine-tunes a pretrained DeiT; convert one with "
                         "`python -m saitjax.tools.convert --src deit_small_patch16_224.safetensors "
                         "--out deit_s.npz` and pass init=deit_s.npz")
    c = base_config()
    c.model = f"sait_deit_{a.size}_patch16_224"
    c.model_kwargs.num_classes = 1000
    c.model_kwargs.drop_path_rate = {"tiny": 0.0, "small": 0.1, "base": 0.1}[a.size]
    c.init = a.init
    c.teacher = "init"

    c.method = "sait"
    c.method_kwargs.locations = (3,)
    c.method_kwargs.densities = tuple(f"mass:{m}[0.1-1]" for m in a.mass.split("/"))
    c.method_kwargs.buckets = (0.25, 0.375, 0.5, 0.625, 0.75, 1.0)
    c.method_kwargs.schedule = "joint"
    c.method_kwargs.distill_source = "teacher"
    c.method_kwargs.distill_weight = 1.0
    c.method_kwargs.token_distill_weight = 1.0

    imagenet_data(c, a.data_dir, a.manual_dir)

    c.batch_size = a.batch
    c.train_epochs = a.epochs
    c.optim.lr_per_512 = a.lr
    c.optim.min_lr = 1e-6
    c.optim.warmup_epochs = 1.0
    c.optim.weight_decay = 0.05

    c.eval.every_steps = 5000
    c.eval.densities = ("dense", "mass:0.9[0.1-1]")
    c.eval.sweep = SWEEP
    c.checkpoint.every_steps = 1000
    return finalize(c)
