"""Matmuls of the compute dtype that accumulate in, and return, float32.

With ``compute.precision=bfloat16`` every projection multiplies bf16 inputs by bf16 weights; the
product is accumulated and returned in float32, the bias is added in float32, and only then is the
result cast back to the compute dtype for the next op. This is what tensor cores and TPU MXUs do
anyway, and the rounding of a 384- or 1536-long sum happens once instead of in bf16.

It is also what makes bf16 fast on CPUs: XLA:CPU hands a bf16 x bf16 -> float32 dot to YNNPACK's
bf16 kernels, while a bf16-output dot falls back to a float32 kernel plus conversions. Measured on
the README's AVX512-BF16 CPU (2 cores, [1576, 384] x [384, 1536]): 174 GFLOP/s with a bf16
output, 377 with a float32 one (float32 inputs: 193; PyTorch/oneDNN bf16: 408). DeiT-S bf16
inference at batch 8 went from 490 to 300 ms. In float32 these helpers compile to exactly the
plain ``nn.Dense`` / ``@`` they replace.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

accumulate_f32 = functools.partial(jax.lax.dot_general, preferred_element_type=jnp.float32)
_conv_accumulate_f32 = functools.partial(jax.lax.conv_general_dilated, preferred_element_type=jnp.float32)


def dense(features: int, dtype: Any, name: str, *, use_bias: bool = True,
          kernel_init: Callable = nn.initializers.lecun_normal()) -> Callable[[Array], Array]:
    """``nn.Dense`` (same parameters) computing in ``dtype``, accumulating in float32, returning
    ``dtype``. Call it inside a compact method, as one would ``nn.Dense``."""
    layer = nn.Dense(features, use_bias=use_bias, dtype=dtype, kernel_init=kernel_init, name=name,
                     dot_general=accumulate_f32)
    return lambda x: layer(x).astype(dtype)


def patch_conv(features: int, patch: int, dtype: Any, name: str) -> Callable[[Array], Array]:
    """Non-overlapping ``patch x patch`` convolution (a ViT patch embedding), float32-accumulated."""
    layer = nn.Conv(features, (patch, patch), strides=(patch, patch), padding="VALID", dtype=dtype,
                    name=name, conv_general_dilated=_conv_accumulate_f32)
    return lambda x: layer(x).astype(dtype)


def matmul(a: Array, b: Array) -> Array:
    """``a @ b`` accumulated in float32, returned in ``b``'s dtype (the compute dtype)."""
    return jnp.matmul(a, b, preferred_element_type=jnp.float32).astype(b.dtype)


__all__ = ["accumulate_f32", "dense", "patch_conv", "matmul"]
