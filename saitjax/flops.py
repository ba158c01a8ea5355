"""FLOPs two ways: analytic from the token schedule, and XLA's own count of a compiled function.

The analytic count follows the convention of every paper in this field (fvcore "FLOPs", which
are multiply-accumulates): per block with N tokens and width C,
``12 N C^2 + 2 N^2 C`` (qkv and output projections, QK^T and AV, the 4x MLP), plus the patch
embedding and the head. Dense DeiT-S is 4.60 GMACs. XLA's ``cost_analysis()`` counts real
floating-point operations (2 per MAC, plus softmax, LayerNorm and GELU), so its figure is a
little more than twice the analytic one.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax

from saitjax.sparsity import SparsitySpec


def block_macs(tokens: Any, dim: int, mlp_ratio: float = 4.0, mlp_tokens: Any = None,
               context_tokens: Any = 0) -> Any:
    """MACs of one pre-norm transformer block (CLS included in the counts).

    ``tokens`` enter the attention (qkv, QK^T, AV, output projection); ``mlp_tokens`` (default:
    the same) reach the MLP: fewer when a method reduces tokens inside the block (EViT, ToMe).
    ``context_tokens`` are extra keys/values the tokens attend to without being queried (STViT's
    image tokens): their k/v projections and the tokens' attention to them. Counts may be arrays.
    """
    mlp_tokens = tokens if mlp_tokens is None else mlp_tokens
    keys = tokens + context_tokens
    return (2 * tokens + 2 * keys) * dim ** 2 + 2 * tokens * keys * dim + 2 * mlp_ratio * mlp_tokens * dim ** 2


def vit_macs(tokens_per_block: Sequence[Any], *, dim: int, patch_size: int, num_patches: int,
             in_chans: int = 3, num_classes: int = 1000, mlp_ratio: float = 4.0,
             num_heads_out: int = 1, context_per_block: Sequence[int] | None = None) -> Any:
    """MACs of a ViT whose block ``i`` processes ``tokens_per_block[i]`` tokens: a count, or an
    ``(attention tokens, MLP tokens)`` pair; ``context_per_block[i]`` extra keys/values."""
    patch = num_patches * dim * in_chans * patch_size ** 2
    blocks = 0
    context_per_block = context_per_block or (0,) * len(tokens_per_block)
    for n, context in zip(tokens_per_block, context_per_block):
        attn, mlp = n if isinstance(n, tuple) else (n, n)
        blocks = blocks + block_macs(attn, dim, mlp_ratio, mlp, context)
    return patch + blocks + num_heads_out * dim * num_classes


def _model_macs(model: Any, schedule: Sequence[Any], spec: SparsitySpec | None = None) -> Any:
    context = model.block_context_tokens(spec) if hasattr(model, "block_context_tokens") else None
    return vit_macs(schedule, dim=model.embed_dim, patch_size=model.patch_size,
                    num_patches=model.num_patches, in_chans=model.in_chans,
                    num_classes=model.num_classes, mlp_ratio=model.mlp_ratio,
                    num_heads_out=2 if model.distilled else 1, context_per_block=context)


def analytic_gmacs(model: Any, spec: SparsitySpec | None = None,
                   tokens_per_block: Sequence[Any] | None = None) -> float:
    """GMACs of ``model`` under ``spec`` (fixed counts) or an explicit token schedule.

    Token counts come from the model (:meth:`VisionTransformer.block_token_counts`), so in-block
    reductions count at the right place. Work a method adds (DynamicViT's predictors, ToMe's
    matching, EViT's fusion) comes from the model's ``extra_macs(spec)`` hook.
    """
    if hasattr(model, "analytic_macs"):  # a model that counts itself (Swin: windows, patch merging)
        return float(model.analytic_macs(spec)) / 1e9
    schedule = tokens_per_block if tokens_per_block is not None else model.block_token_counts(spec)
    return float(_model_macs(model, schedule, spec) + _extra_macs(model, spec)) / 1e9


def per_image_gmacs(model: Any, spec: SparsitySpec, stage_counts: Sequence[Any]) -> Any:
    """GMACs per image ``[B]`` given per-image patch counts after each pruning stage.

    For adaptive rules: pass the kept counts for the ideal cost of each image, or the capacity
    each image ran in for the executed cost. Works on NumPy and JAX arrays (inside jit too).
    """
    return (_model_macs(model, model.block_token_counts(spec, stage_counts), spec) + _extra_macs(model, spec)) / 1e9


def density_cost(model: Any, spec: SparsitySpec, result: Mapping[str, Any]) -> dict[str, float]:
    """Cost of one evaluated density: GMACs ideal and executed, and the fraction of patch tokens
    left after the last stage. Per-image rules take them from the evaluator's ``result`` (the
    mean of each image's cost, and of the capacity it ran in); fixed counts cost the same for
    every image, so the analytic figure is both."""
    static, final_tokens = None, model.num_patches
    if not spec.is_adaptive:
        static = analytic_gmacs(model, spec)
        if hasattr(model, "block_token_counts"):  # token models; maps (Swin, ConvNeXt) keep every location
            final_tokens = model.block_token_counts(spec)[-1][1] - model.num_prefix_tokens
    return {"gmacs": result.get("gmacs", static), "gmacs_executed": result.get("gmacs_executed", static),
            "kept_fraction": result.get("kept_fraction", final_tokens / model.num_patches)}


def _extra_macs(model: Any, spec: SparsitySpec | None) -> float:
    extra = getattr(model, "extra_macs", None)
    return 0.0 if extra is None else extra(spec)


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
