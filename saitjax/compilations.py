"""Counting compilations through JAX's public monitoring events.

Static shapes are the project's rule: a different image, a different per-image token count or a
different bucket must not cost a new XLA compilation, and a training run should compile its step
once per sparsity spec. This counts them without JAX's private ``_cache_size``:

    with CompilationCounter() as compiled:
        for x in images:
            fn(params, x)
    assert compiled.of(fn) == 1

Every jitted function that is traced and lowered for a new signature records one
``jaxpr_to_mlir_module`` event named ``jit(<function name>)``, whether the executable then comes from
XLA or from the persistent compilation cache; calls served by the in-memory cache record none.
Eager operations (``x * 2``) are small jitted primitives with their own names, so count by name.
"""

from __future__ import annotations

import collections
from typing import Any, Callable

import jax

LOWERING_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"


class CompilationCounter:
    """A context manager that counts lowerings to XLA per jitted-function name while it is open."""

    def __init__(self) -> None:
        self.by_name: collections.Counter[str] = collections.Counter()
        self._listener = self._record  # one bound method, so that unregistering finds it

    def _record(self, event: str, duration_secs: float, **kwargs: Any) -> None:
        del duration_secs
        if event == LOWERING_EVENT:
            self.by_name[str(kwargs.get("fun_name", ""))] += 1

    def __enter__(self) -> CompilationCounter:
        jax.monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listener)

    def of(self, fn: Callable[..., Any] | str) -> int:
        """Compilations of ``fn`` (a function passed to ``jax.jit``, the jitted function or its name).

        Functions with the same name (two lambdas) are counted together."""
        name = fn if isinstance(fn, str) else getattr(fn, "__name__", None)
        if not name:
            raise TypeError(f"cannot tell the name of {fn!r}; pass the name as a string")
        return self.by_name[f"jit({name})"]

    @property
    def total(self) -> int:
        """Every lowering while open, eager primitives included."""
        return sum(self.by_name.values())
