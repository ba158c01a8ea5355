"""Reading checkpoints of other frameworks and saitjax's own flat ``.npz`` params.

* ``.safetensors`` is read with safetensors' numpy backend: no torch needed.
* ``.pth`` / ``.pt`` / ``.bin`` go through ``torch.load(weights_only=True)`` (torch is an
  optional extra); nested ``{"model": ...}`` / ``{"state_dict": ...}`` wrappers are unwrapped.
* ``.npz`` is saitjax's exchange format: one array per parameter under its Linen path
  (``blocks_0/attn/qkv/kernel``) plus a JSON metadata entry naming the model it came from.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from saitjax.convert.timm_deit import (ConversionError, convert_state_dict, expected_param_shapes,
                                       fit_pos_embed, guess_model_name)

META_KEY = "__saitjax_meta__"
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# Keys under which training scripts nest the weights, in order of preference.
NESTED_KEYS = ("model", "state_dict", "model_state", "params")


def _unwrap(obj: Any) -> dict[str, Any]:
    while isinstance(obj, Mapping):
        nested = next((k for k in NESTED_KEYS if isinstance(obj.get(k), Mapping)), None)
        if nested is None:
            break
        obj = obj[nested]
    if not isinstance(obj, Mapping):
        raise ConversionError(f"checkpoint holds a {type(obj).__name__}, not a state dict")
    return dict(obj)


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """Flat ``{name: array}`` from a PyTorch or safetensors checkpoint file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return load_file(path)
    if path.endswith(TORCH_SUFFIXES):
        try:
            import torch
        except ImportError as err:
            raise ImportError(f"reading {path} needs PyTorch: pip install 'saitjax[torch]', or convert "
                              "the checkpoint to .safetensors, which needs no torch") from err
        obj = torch.load(path, map_location="cpu", weights_only=True)
        return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
                for k, v in _unwrap(obj).items() if hasattr(v, "numpy")}
    raise ConversionError(f"unknown checkpoint format {path!r}: expected .safetensors, "
                          f"{'/'.join(TORCH_SUFFIXES)} or .npz")


def save_params(path: str, params: Mapping[str, Any], *, model: str, overwrite: bool = False,
                **meta: Any) -> str:
    """Write ``params`` as a flat ``.npz`` with metadata; refuses to overwrite unless asked."""
    if not path.endswith(".npz"):
        raise ValueError(f"params are saved as .npz; got {path!r}")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    flat = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(dict(params)).items()}
    from saitjax import __version__

    flat[META_KEY] = np.asarray(json.dumps({"model": model, "saitjax_version": __version__, **meta}))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path[: -len(".npz")] + ".tmp.npz"
    np.savez(tmp, **flat)
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written file under `path`
    return path


def read_npz(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(nested params, metadata)`` from a saitjax ``.npz``."""
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data[META_KEY])) if META_KEY in data else {}
        flat = {tuple(k.split("/")): data[k] for k in data.files if k != META_KEY}
    return traverse_util.unflatten_dict(flat), meta


def load_params(path: str, model: str | None = None, *, strict: bool = True,
                skip_mismatched: str | None = None, **model_overrides: Any) -> dict[str, Any]:
    """Params ready for ``create_model(model).apply({"params": params}, images)``.

    Accepts a saitjax ``.npz`` or a timm/DeiT checkpoint (``.safetensors``, ``.pth``). ``model``
    defaults to the name recorded in the ``.npz`` (or guessed from a DeiT checkpoint's shapes);
    the params are checked against that model and any mismatch raises a ConversionError that
    lists it. ``model_overrides`` (e.g. ``img_size=384``) build the target model. Parameters at
    paths matching the regex ``skip_mismatched`` are left out when their shapes differ (a new
    classifier head when fine-tuning to another label set).
    """
    return load_params_and_name(path, model, strict=strict, skip_mismatched=skip_mismatched,
                                **model_overrides)[0]


def load_params_and_name(path: str, model: str | None = None, *, strict: bool = True,
                         skip_mismatched: str | None = None,
                         **model_overrides: Any) -> tuple[dict[str, Any], str]:
    """Like :func:`load_params`, also returning the model name the params were checked against."""
    from saitjax.models import create_model

    if not os.path.isfile(path):
        raise FileNotFoundError(f"params file {path!r} does not exist")
    if path.endswith(".npz"):
        params, meta = read_npz(path)
        name = model or meta.get("model")
        if name is None:
            raise ConversionError(f"{path} records no model name; pass model=...")
        target = create_model(name, **model_overrides)
        return _check_npz(params, expected_param_shapes(target), name, strict, target,
                          skip_mismatched), name
    state_dict = read_state_dict(path)
    name = model or guess_model_name(state_dict)
    if name is None:
        raise ConversionError(f"cannot tell which model {path} belongs to; pass model=...")
    target = create_model(name, **model_overrides)
    return convert_state_dict(state_dict, target, model_name=name, strict=strict,
                              skip_mismatched=skip_mismatched), name


def _check_npz(params, expected, name, strict, model, skip_mismatched=None) -> dict[str, Any]:
    flat = traverse_util.flatten_dict(params)
    problems = []
    for path, value in list(flat.items()):
        want = expected.get(path)
        if want is None:
            problems.append(f"unknown parameter {'/'.join(path)} {value.shape}")
        elif tuple(value.shape) != want:
            if path == ("pos_embed",):
                flat[path] = fit_pos_embed(value, model)
                continue
            if skip_mismatched and re.search(skip_mismatched, "/".join(path)):
                del flat[path]
                continue
            problems.append(f"{'/'.join(path)}: file {value.shape} vs model {want}")
    if strict:
        problems += [f"missing parameter {'/'.join(p)} {s}" for p, s in expected.items()
                     if p not in flat and not (skip_mismatched and re.search(skip_mismatched, "/".join(p)))]
    if problems:
        raise ConversionError(f"params do not fit {name} ({len(problems)} problem(s)):\n    "
                              + "\n    ".join(problems[:12])
                              + ("\n    ..." if len(problems) > 12 else "")
                              + "\nIs it a file of another model? Pass the matching model=... name.")
    return traverse_util.unflatten_dict(flat)
