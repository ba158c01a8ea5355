"""Set an AS-ViT's thresholds so that a chosen fraction of the tokens passes each stage, and save it.

    python experiments/asvit_thresholds.py --model asvit_deit_small_patch16_224 --keep 0.7 \
        --out /tmp/asvit_s_keep07.npz
    python -m saitjax.benchmark --model asvit_deit_small_patch16_224 --params /tmp/asvit_s_keep07.npz \
        --density learned:1@4/7/10 --batch-sizes 1,32

Trained AS-ViT checkpoints are not downloadable here, so the benchmark times a model with the
benchmark's own random weights (same seed) whose thresholds are calibrated, stage by stage, on
the benchmark's kind of input (standard-normal images): threshold ``s`` is the score quantile that
leaves ``keep`` of the tokens alive after stage ``s - 1``. With 0.7 this is DynamicViT's
schedule, 137 / 96 / 67 of 196 patches. The speed of the machinery does not depend on the
weights being trained; the counts do, which is why they are set here.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np


def calibrate(model, params, images: np.ndarray, keep: float) -> dict:
    """Params with ``score_predictor_{s}/keep_threshold`` set stage by stage (see module doc)."""
    from saitjax.sparsity import SparsitySpec

    params = jax.tree.map(lambda v: v, params)
    stages = len(model.pruning_loc)
    for s in range(stages):
        for later in range(s, stages):  # later stages keep everything while stage s is measured
            params[f"score_predictor_{later}"] = {"keep_threshold": jnp.float32(-1.0)}
        spec = SparsitySpec.learned(1.0, model.pruning_loc, mode="mask")
        _, aux = jax.jit(lambda p, x: model.apply({"params": p}, x, sparsity=spec))(params, images)
        alive = np.asarray(aux["keep_masks"][s - 1]) > 0 if s else np.ones(aux["token_scores"][0].shape, bool)
        scores = np.asarray(aux["token_scores"][s])[alive]
        threshold = float(np.quantile(scores, 1.0 - keep))
        params[f"score_predictor_{s}"] = {"keep_threshold": jnp.float32(threshold)}
    return params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="asvit_deit_small_patch16_224")
    parser.add_argument("--keep", type=float, default=0.7, help="fraction of the alive tokens kept per stage")
    parser.add_argument("--images", type=int, default=32, help="calibration images (standard normal)")
    parser.add_argument("--seed", type=int, default=0, help="weights seed: the benchmark's default is 0")
    parser.add_argument("--out", required=True, help=".npz to write (load with --params)")
    args = parser.parse_args(argv)

    import saitjax
    from saitjax.convert import save_params

    model = saitjax.create_model(args.model)
    shape = (model.img_size, model.img_size, model.in_chans)
    params = jax.jit(model.init)(jax.random.key(args.seed), jnp.zeros((1,) + shape))["params"]
    images = np.random.default_rng(1).normal(size=(args.images,) + shape).astype(np.float32)
    params = calibrate(model, params, images, args.keep)
    _, aux = model.apply({"params": params}, images)
    counts = [float(np.mean(c)) for c in aux["kept_counts"]]
    thresholds = [float(params[f"score_predictor_{s}"]["keep_threshold"]) for s in range(len(model.pruning_loc))]
    print(f"thresholds {['%.6f' % t for t in thresholds]}; kept tokens per stage (mean) {counts}")
    save_params(args.out, jax.device_get(params), model=args.model)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
