"""CompilationCounter: counts what was lowered, by name, only while open."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from saitjax.compilations import CompilationCounter


def test_counts_new_signatures_not_cached_calls():
    def double(x):
        return x * 2

    fn = jax.jit(double)
    fn(jnp.ones(3))  # compiled before the counter opens: not counted
    with CompilationCounter() as compiled:
        fn(jnp.ones(3))
        fn(5.0 * jnp.ones(3))  # new values, same shape and dtype: the cached executable
        fn(jnp.ones(4))  # new shape: one compilation
        fn(jnp.ones(3, jnp.int32))  # new dtype: one more
    assert compiled.of(fn) == compiled.of(double) == compiled.of("double") == 2
    assert compiled.total > 2  # jnp.ones and the multiplication are small jitted primitives of their own
    fn(jnp.ones(5))  # after the counter closed: not counted
    assert compiled.of(fn) == 2


def test_static_argument_values_compile_once_each():
    fn = jax.jit(lambda x, k: x[:k], static_argnums=1)
    with CompilationCounter() as compiled:
        for k in (1, 2, 1, 2, 3):
            fn(jnp.arange(4.0), k)
    assert compiled.of(fn) == 3


def test_a_function_without_a_name_is_an_error():
    with CompilationCounter() as compiled, pytest.raises(TypeError, match="pass the name as a string"):
        compiled.of(object())
