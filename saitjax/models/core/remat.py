"""Rematerialisation of blocks: activations recomputed in the backward pass instead of stored.

``remat`` names what each block keeps for the backward pass: ``"none"`` (everything, the
default), ``"full"`` (only the block's inputs; everything inside is recomputed), or the name of
any :mod:`jax.checkpoint_policies` policy (``"dots_saveable"``: keep matmul outputs and recompute
the element-wise work; ``"dots_with_no_batch_dims_saveable"``: keep the projections, recompute
the attention matrices). The forward values and gradients are unchanged (tested).
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax


def remat_policy(name: str) -> Callable[..., bool] | None:
    """The :func:`jax.checkpoint` policy of ``name`` (``None`` for ``"full"``)."""
    if name == "full":
        return None
    choices = sorted(p for p in dir(jax.checkpoint_policies) if p.endswith("_saveable"))
    if name not in choices:
        raise ValueError(f"remat={name!r}: choose 'none', 'full' or a jax.checkpoint_policies "
                         f"policy ({', '.join(choices)})")
    return getattr(jax.checkpoint_policies, name)


def check_remat(name: str) -> None:
    if name != "none":
        remat_policy(name)


def remat_module(cls: type[nn.Module], name: str, methods: Sequence[str], train_argnum: int) -> type[nn.Module]:
    """``cls`` with ``methods`` rematerialised under policy ``name`` (``cls`` itself for "none").

    ``train_argnum``: position of the static ``train`` flag in every method (``self`` is 0), which
    must be the same in all of them. Parameter names do not change (modules named by attribute).
    """
    if name == "none":
        return cls
    return nn.remat(cls, policy=remat_policy(name), static_argnums=(train_argnum,), methods=list(methods))

