"""AS-ViT-DeiT on ImageNet-1k: the released fine-tuning recipe (finetune.sh; methods-more.md §4.3).

Start from converted dense DeiT weights, which are also the frozen distillation teacher:

    python -m saitjax.tools.convert --src deit_small_patch16_224.safetensors --out deit_s.npz
    python -m saitjax.main --config configs/asvit_deit_imagenet.py:model=small,init=deit_s.npz \
        --workdir /ckpt/asvit_s --config.data.manual_dir=/data/imagenet_manual

Published DeiT-S result: 79.6 % top-1 (-0.2 against DeiT-S), throughput +50 % (2080Ti, batch 64);
the budget 0.65 targets 2.99 GMACs. The official training code does not run as released; this is
the recipe its scripts describe.

Recipe: 30 epochs at batch 512, AdamW, lr 2e-5 (x batch/512; one lr for every parameter, the
thresholds included), cosine to 2e-6, no warm-up, weight decay 1e-6 (none on the thresholds),
drop-path 0.1, RandAugment, mixup 0.8 / cutmix 1.0, label smoothing 0.1; loss CE + 2.0 x budget
(0.65 of the dense MACs) + 0.5 x logit KL to the dense teacher; thresholds start at 0.001 / 0.002
/ 0.003 before blocks 4, 7, 10. Not reproduced: the EMA of the weights (0.99996), repeated
augmentation and random erasing.

Arguments: model (tiny/small/base), init (a converted dense DeiT .npz of the same size), budget
(0.65), data_dir, manual_dir, batch (512), epochs (30). Evaluated at "dense" and at the learned
thresholds ("learned:1@4/7/10").
"""

from saitjax.config import base_config, finalize, imagenet_data, parse_arg

SIZES = ("tiny", "small", "base")
LOCATIONS = (4, 7, 10)


def get_config(arg: str | None = None):
    a = parse_arg(arg, model="small", init="", budget=0.65, data_dir="", manual_dir="", batch=512, epochs=30.0)
    if a.model not in SIZES:
        raise ValueError(f"invalid config: model={a.model!r}; choose one of {SIZES}")
    c = base_config()
    c.model = f"asvit_deit_{a.model}_patch16_224"
    c.model_kwargs.num_classes = 1000
    c.model_kwargs.drop_path_rate = 0.1
    c.model_kwargs.pruning_loc = LOCATIONS
    c.init = a.init
    c.teacher = "init" if a.init else ""

    c.method = "asvit"
    c.method_kwargs.update(base_rate=a.budget, ratio_weight=2.0, distill_weight=0.5 if a.init else 0.0)

    imagenet_data(c, a.data_dir, a.manual_dir)

    c.batch_size = a.batch
    c.train_epochs = a.epochs
    c.optim.lr_per_512 = 2e-5
    c.optim.min_lr = 2e-6
    c.optim.warmup_epochs = 0.0
    c.optim.weight_decay = 1e-6

    locs = "/".join(map(str, LOCATIONS))
    c.eval.densities = ("dense", f"learned:1@{locs}")
    c.eval.sweep = ("dense", f"learned:0.8@{locs}", f"learned:1@{locs}", f"learned:1.25@{locs}")
    c.eval.every_steps = 2500
    c.checkpoint.every_steps = 1000
    return finalize(c)
