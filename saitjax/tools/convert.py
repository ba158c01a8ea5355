"""Convert a timm/DeiT checkpoint into a saitjax ``.npz``.

    python -m saitjax.tools.convert --src deit_small_patch16_224.safetensors \
        --model deit_small_patch16_224 --out deit_small.npz

``--src`` may be ``.safetensors`` (no torch needed), ``.pth``/``.pt`` (needs torch) or another
saitjax ``.npz`` (re-validated, e.g. to resize position embeddings with ``--img-size``).
BatchNorm running statistics (STViT-R's stem) are converted too and stored beside the params.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np

from saitjax.convert import ConversionError, save_variables
from saitjax.convert.io import load_variables_and_name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m saitjax.tools.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, help="checkpoint to convert")
    parser.add_argument("--model", default=None, help="saitjax model name (default: guessed)")
    parser.add_argument("--out", required=True, help="output .npz")
    parser.add_argument("--img-size", type=int, default=None, help="target resolution (pos-embed resize)")
    parser.add_argument("--num-classes", type=int, default=None, help="target number of classes")
    parser.add_argument("--non-strict", action="store_true",
                        help="allow model parameters absent from the checkpoint (they are left out)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in (("img_size", args.img_size), ("num_classes", args.num_classes)) if v}
    if os.path.exists(args.out) and not args.overwrite:
        print(f"error: {args.out} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    try:
        variables, name = load_variables_and_name(args.src, args.model, strict=not args.non_strict,
                                                  **overrides)
        save_variables(args.out, variables, model=name, source=args.src, overwrite=args.overwrite, **overrides)
    except (ConversionError, FileNotFoundError, FileExistsError, ValueError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    counts = {col: sum(np.size(v) for v in jax.tree.leaves(tree)) for col, tree in variables.items()}
    stats = "".join(f", {n:,} {col} values" for col, n in counts.items() if col != "params")
    print(f"wrote {args.out}: {name}, {counts['params']:,} parameters{stats}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
