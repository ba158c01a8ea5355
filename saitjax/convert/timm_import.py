"""Import timm (PyTorch reference models) even where no CPU build of torchvision exists.

timm imports a few torchvision names at import time (transforms, FrozenBatchNorm2d, ...) but
the ViT/DeiT forward never uses them. When the real torchvision cannot be imported we install a
minimal stand-in module that provides those names, then import timm. Used by the parity tests
and by ``benchmark --vs-timm``; torch and timm stay optional extras.
"""

from __future__ import annotations

import importlib
import sys
import types


def _install_torchvision_standin() -> None:
    class _Placeholder:
        """Stands in for any torchvision class timm names at import time."""

        def __init__(self, *args, **kwargs):
            raise RuntimeError("torchvision stand-in: this feature needs the real torchvision")

    def module(name: str) -> types.ModuleType:
        mod = types.ModuleType(name)
        def resolve(attr: str):
            if attr.startswith("__"):  # keep module introspection (inspect, pickle) truthful
                raise AttributeError(attr)
            return _Placeholder

        mod.__getattr__ = resolve  # every public attribute resolves to the placeholder
        mod.__path__ = []  # a package, so submodules import
        sys.modules[name] = mod
        return mod

    root = module("torchvision")
    root.__version__ = "0.0.0-standin"
    for sub in ("transforms", "transforms.functional", "transforms.v2", "ops", "ops.misc",
                "datasets", "models", "models.feature_extraction", "io", "utils"):
        mod = module(f"torchvision.{sub}")
        parent = sys.modules[f"torchvision.{sub.rsplit('.', 1)[0]}"] if "." in sub else root
        setattr(parent, sub.rsplit(".", 1)[-1], mod)
    interp = type("InterpolationMode", (), {n: n.lower() for n in
                                            ("NEAREST", "BILINEAR", "BICUBIC", "BOX", "HAMMING", "LANCZOS")})
    sys.modules["torchvision.transforms"].InterpolationMode = interp
    sys.modules["torchvision.transforms.functional"].InterpolationMode = interp


def import_timm():
    """``(torch, timm)``; ImportError when either is missing (``pip install 'saitjax[torch]'``)."""
    import torch

    try:
        importlib.import_module("torchvision")
    except Exception:  # noqa: BLE001 - any failure means: no usable torchvision here
        sys.modules.pop("torchvision", None)
        _install_torchvision_standin()
    timm = importlib.import_module("timm")
    return torch, timm
