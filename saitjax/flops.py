"""FLOPs two ways: analytic from the token schedule, and XLA's own count of a compiled function.

The analytic count follows the convention of every paper in this field (fvcore "FLOPs", which
are multiply-accumulates): per block with N tokens and width C,
``12 N C^2 + 2 N^2 C`` (qkv and output projections, QK^T and AV, the 4x MLP), plus the patch
embedding and the head. Dense DeiT-S is 4.60 GMACs. XLA's ``cost_analysis()`` counts real
floating-point operations (2 per MAC, plus softmax, LayerNorm and GELU), so its figure is a
little more than twice the analytic one.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax

from saitjax.sparsity import SparsitySpec


def block_macs(tokens: float, dim: int, mlp_ratio: float = 4.0) -> float:
    """MACs of one pre-norm transformer block on ``tokens`` tokens (CLS included)."""
    return (4 + 2 * mlp_ratio) * tokens * dim ** 2 + 2 * tokens ** 2 * dim


def vit_macs(tokens_per_block: Sequence[float], *, dim: int, patch_size: int, num_patches: int,
             in_chans: int = 3, num_classes: int = 1000, mlp_ratio: float = 4.0,
             num_heads_out: int = 1) -> float:
    """MACs of a ViT whose block ``i`` processes ``tokens_per_block[i]`` tokens."""
    patch = num_patches * dim * in_chans * patch_size ** 2
    blocks = sum(block_macs(n, dim, mlp_ratio) for n in tokens_per_block)
    return patch + blocks + num_heads_out * dim * num_classes


def analytic_gmacs(model: Any, spec: SparsitySpec | None = None,
                   tokens_per_block: Sequence[float] | None = None) -> float:
    """GMACs of ``model`` under ``spec`` (fixed counts) or an explicit (mean) token schedule.

    Methods with extra modules (e.g. DynamicViT's predictors) add them through the model's
    ``extra_macs(spec)`` hook.
    """
    schedule = tokens_per_block if tokens_per_block is not None else model.token_schedule(spec)
    macs = vit_macs(schedule, dim=model.embed_dim, patch_size=model.patch_size,
                    num_patches=model.num_patches, in_chans=model.in_chans,
                    num_classes=model.num_classes, mlp_ratio=model.mlp_ratio,
                    num_heads_out=2 if model.distilled else 1)
    extra = getattr(model, "extra_macs", None)
    if extra is not None:
        macs += extra(spec)
    return macs / 1e9


def mean_token_schedule(model: Any, spec: SparsitySpec, stage_fractions: Sequence[float]) -> list[float]:
    """Mean tokens entering each block given the mean kept fraction after each stage.

    For adaptive (per-image) rules; pass it to :func:`analytic_gmacs` as ``tokens_per_block``.
    GMACs at the mean count slightly understate the attention term (``E[N^2] >= E[N]^2``).
    """
    n, p = model.num_patches, model.num_prefix_tokens
    counts = {} if spec.is_dense else {loc: f * n for loc, f in zip(spec.locations, stage_fractions)}
    schedule, current = [], float(n)
    for i in range(model.depth):
        current = counts.get(i, current)
        schedule.append(current + p)
    return schedule


def xla_flops(compiled_or_fn: Any, *args: Any) -> float:
    """Floating-point operations XLA counts for one call (``nan`` if the backend reports none).

    Pass a ``jax.stages.Compiled`` or a function plus example arguments (it is jitted, lowered and
    compiled here).
    """
    compiled = compiled_or_fn
    if not hasattr(compiled, "cost_analysis"):
        fn: Callable = compiled_or_fn
        compiled = jax.jit(fn).lower(*args).compile()
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older JAX returned one dict per device program
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", float("nan")))
