"""Training methods, by config name."""

from saitjax.methods.asvit import ASViTMethod
from saitjax.methods.base import Method
from saitjax.methods.dynamicvit import DynamicViTMethod
from saitjax.methods.evit import EViTMethod
from saitjax.methods.sait import SaiTMethod

# "supervised" (alias "dense"): plain training at the model's own sparsity (dense DeiT, ToMe's r).
METHODS: dict[str, type[Method]] = {"dense": Method, "supervised": Method, "asvit": ASViTMethod,
                                    "dynamicvit": DynamicViTMethod, "evit": EViTMethod, "sait": SaiTMethod}


def build_method(config, model) -> Method:
    """The method named by ``config.method`` for ``model``."""
    try:
        cls = METHODS[config.method]
    except KeyError:
        raise ValueError(f"invalid config: method={config.method!r} is unknown; choose one of "
                         f"{sorted(METHODS)}") from None
    return cls(config, model)


__all__ = ["METHODS", "Method", "build_method"]
