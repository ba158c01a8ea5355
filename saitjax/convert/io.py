"""Reading checkpoints of other frameworks and saitjax's own flat ``.npz`` params.

* ``.safetensors`` is read with safetensors' numpy backend: no torch needed.
* ``.pth`` / ``.pt`` / ``.bin`` go through ``torch.load(weights_only=True)`` (torch is an
  optional extra); nested ``{"model": ...}`` / ``{"state_dict": ...}`` wrappers are unwrapped.
* ``.npz`` is saitjax's exchange format: one array per parameter under its Linen path
  (``blocks_0/attn/qkv/kernel``) plus a JSON metadata entry naming the model it came from.
  Other collections (BatchNorm ``batch_stats``) are stored under ``<collection>/<path>`` and
  listed in the metadata (``"collections"``); files without that entry hold params only, so every
  earlier file reads as before.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from saitjax.convert.timm_deit import (ConversionError, convert_variables, expected_variable_shapes,
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


def _torch_load_cause(err: BaseException) -> str:
    """The reason a ``weights_only`` load failed, without torch's advice to load it unsafely."""
    for pattern in (r"WeightsUnpickler error: (.+?)(?: Please use|$)", r"(Unsupported operand \d+)"):
        found = re.search(pattern, str(err), re.M)
        if found and found.group(1).strip():
            return found.group(1).strip()
    return type(err).__name__


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """Flat ``{name: array}`` from a PyTorch or safetensors checkpoint file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        try:
            return load_file(path)
        except Exception as err:  # noqa: BLE001 - SafetensorError, OSError: the file is not usable
            raise ConversionError(f"{path} is not a readable .safetensors file ({err}); it is truncated or "
                                  "not a safetensors file: download or export it again") from None
    if path.endswith(TORCH_SUFFIXES):
        try:
            import torch
        except ImportError as err:
            raise ImportError(f"reading {path} needs PyTorch: pip install 'saitjax[torch]', or convert "
                              "the checkpoint to .safetensors, which needs no torch") from err
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError, ...
            raise ConversionError(
                f"{path} cannot be read as tensors only ({_torch_load_cause(err)}). It holds "
                "Python objects (a whole nn.Module, an optimizer, custom classes) or is damaged. Save the "
                "weights alone with torch.save(model.state_dict(), path), or export them to .safetensors"
            ) from None
        return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
                for k, v in _unwrap(obj).items() if hasattr(v, "numpy")}
    raise ConversionError(f"unknown checkpoint format {path!r}: expected .safetensors, "
                          f"{'/'.join(TORCH_SUFFIXES)} or .npz")


def save_params(path: str, params: Mapping[str, Any], *, model: str, overwrite: bool = False,
                **meta: Any) -> str:
    """Write ``params`` as a flat ``.npz`` with metadata; refuses to overwrite unless asked."""
    return save_variables(path, {"params": params}, model=model, overwrite=overwrite, **meta)


def save_variables(path: str, variables: Mapping[str, Any], *, model: str, overwrite: bool = False,
                   **meta: Any) -> str:
    """Write every collection (``{"params": ..., "batch_stats": ...}``) as one flat ``.npz``.

    Params keep their plain paths (a params-only file is what :func:`save_params` always wrote);
    other collections go under ``<collection>/`` and are listed in the metadata.
    """
    if not path.endswith(".npz"):
        raise ValueError(f"params are saved as .npz; got {path!r}")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    if "params" not in variables:
        raise ValueError(f"variables need a 'params' collection; got {sorted(variables)}")
    flat = {}
    for col, tree in variables.items():
        prefix = () if col == "params" else (col,)
        flat.update({"/".join(prefix + k): np.asarray(v) for k, v in traverse_util.flatten_dict(dict(tree)).items()})
    extra = sorted(set(variables) - {"params"})
    if extra:
        meta = {**meta, "collections": ["params"] + extra}
    from saitjax import __version__

    flat[META_KEY] = np.asarray(json.dumps({"model": model, "saitjax_version": __version__, **meta}))
    parent = os.path.dirname(os.path.abspath(path))
    blocker = next((d for d in _ancestors(parent) if os.path.exists(d) and not os.path.isdir(d)), None)
    if blocker is not None:
        raise ValueError(f"cannot write {path}: {blocker} is a file, not a directory; choose another path")
    os.makedirs(parent, exist_ok=True)
    tmp = path[: -len(".npz")] + ".tmp.npz"
    np.savez(tmp, **flat)
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written file under `path`
    return path


def _ancestors(directory: str) -> list[str]:
    """``directory`` and every folder above it, top first."""
    out = [directory]
    while os.path.dirname(out[-1]) != out[-1]:
        out.append(os.path.dirname(out[-1]))
    return out[::-1]


def read_npz(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(nested params, metadata)`` from a saitjax ``.npz`` (other collections left out)."""
    variables, meta = read_npz_variables(path)
    return variables["params"], meta


def read_npz_variables(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``({collection: nested tree}, metadata)`` from a saitjax ``.npz``; always has ``params``."""
    try:
        return _read_npz_variables(path)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        if isinstance(err, FileNotFoundError):
            raise
        cause = "it holds pickled objects, not arrays" if "pickle" in str(err) else f"{type(err).__name__}: {err}"
        raise ConversionError(f"{path} is not a readable saitjax .npz ({cause}); it is truncated or not "
                              "a saitjax .npz: export or convert it again") from None


def _read_npz_variables(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data[META_KEY])) if META_KEY in data else {}
        others = set(meta.get("collections", ())) - {"params"}
        flat: dict[str, dict] = {"params": {}, **{col: {} for col in others}}
        for key in data.files:
            if key == META_KEY:
                continue
            path_ = tuple(key.split("/"))
            col = path_[0] if path_[0] in others else "params"
            flat[col][path_[1:] if col != "params" else path_] = data[key]
    return {col: traverse_util.unflatten_dict(tree) for col, tree in flat.items()}, meta


def load_params(path: str, model: str | None = None, *, strict: bool = True,
                skip_mismatched: str | None = None, **model_overrides: Any) -> dict[str, Any]:
    """Params ready for ``create_model(model).apply({"params": params}, images)``.

    Accepts a saitjax ``.npz`` or a timm/DeiT checkpoint (``.safetensors``, ``.pth``). ``model``
    defaults to the name recorded in the ``.npz`` (or guessed from a DeiT checkpoint's shapes);
    the params are checked against that model and any mismatch raises a ConversionError that
    lists it. ``model_overrides`` (e.g. ``img_size=384``) build the target model. Parameters at
    paths matching the regex ``skip_mismatched`` are left out when their shapes differ (a new
    classifier head when fine-tuning to another label set). A model with BatchNorm statistics
    raises rather than dropping them: use :func:`load_variables`.
    """
    return load_params_and_name(path, model, strict=strict, skip_mismatched=skip_mismatched,
                                **model_overrides)[0]


def load_params_and_name(path: str, model: str | None = None, *, strict: bool = True,
                         skip_mismatched: str | None = None,
                         **model_overrides: Any) -> tuple[dict[str, Any], str]:
    """Like :func:`load_params`, also returning the model name the params were checked against."""
    variables, name = load_variables_and_name(path, model, strict=strict, skip_mismatched=skip_mismatched,
                                              **model_overrides)
    extra = sorted(set(variables) - {"params"})
    if extra:
        raise ConversionError(f"{name} keeps {', '.join(extra)} (BatchNorm running statistics) besides params; "
                              "load_params would drop them. Use saitjax.convert.load_variables(path, model) and "
                              "apply with the whole dict: model.apply(variables, images).")
    return variables["params"], name


def load_variables(path: str, model: str | None = None, *, strict: bool = True,
                   skip_mismatched: str | None = None, **model_overrides: Any) -> dict[str, Any]:
    """Every collection the model needs, ready for ``create_model(model).apply(variables, images)``:
    ``{"params": ...}``, plus ``"batch_stats"`` for a BatchNorm model (STViT-R).

    Same sources, checks and arguments as :func:`load_params`; ``strict`` covers the statistics
    too (with ``strict=False`` an absent collection comes back empty, for the caller to initialise).
    """
    return load_variables_and_name(path, model, strict=strict, skip_mismatched=skip_mismatched,
                                   **model_overrides)[0]


def load_variables_and_name(path: str, model: str | None = None, *, strict: bool = True,
                            skip_mismatched: str | None = None,
                            **model_overrides: Any) -> tuple[dict[str, Any], str]:
    """Like :func:`load_variables`, also returning the model name they were checked against."""
    from saitjax.models import create_model

    if not os.path.isfile(path):
        raise FileNotFoundError(f"params file {path!r} does not exist")
    if path.endswith(".npz"):
        variables, meta = read_npz_variables(path)
        name = model or meta.get("model")
        if name is None:
            raise ConversionError(f"{path} records no model name; pass model=...")
        target = create_model(name, **model_overrides)
        expected = expected_variable_shapes(target)
        unexpected = sorted(set(variables) - set(expected))
        if unexpected:
            raise ConversionError(f"{path} holds collection(s) {unexpected} that {name} does not have "
                                  f"(it has {sorted(expected)}); is it a file of another model?")
        return {col: _check_npz(variables.get(col, {}), shapes, name, strict, target, skip_mismatched, col)
                for col, shapes in expected.items()}, name
    state_dict = read_state_dict(path)
    name = model or guess_model_name(state_dict)
    if name is None:
        raise ConversionError(f"cannot tell which model {path} belongs to; pass model=...")
    target = create_model(name, **model_overrides)
    return convert_variables(state_dict, target, model_name=name, strict=strict,
                             skip_mismatched=skip_mismatched), name


def _check_npz(params, expected, name, strict, model, skip_mismatched=None, collection="params") -> dict[str, Any]:
    flat = traverse_util.flatten_dict(params)
    problems = []
    what = "parameter" if collection == "params" else f"{collection} entry"
    for path, value in list(flat.items()):
        want = expected.get(path)
        if want is None:
            problems.append(f"unknown {what} {'/'.join(path)} {value.shape}")
        elif tuple(value.shape) != want:
            if path == ("pos_embed",) and collection == "params":
                flat[path] = fit_pos_embed(value, model)
                continue
            if skip_mismatched and re.search(skip_mismatched, "/".join(path)):
                del flat[path]
                continue
            problems.append(f"{'/'.join(path)}: file {value.shape} vs model {want}")
    if strict:
        problems += [f"missing {what} {'/'.join(p)} {s}" for p, s in expected.items()
                     if p not in flat and not (skip_mismatched and re.search(skip_mismatched, "/".join(p)))]
    if problems:
        raise ConversionError(f"params do not fit {name} ({len(problems)} problem(s)):\n    "
                              + "\n    ".join(problems[:12])
                              + ("\n    ..." if len(problems) > 12 else "")
                              + "\nIs it a file of another model? Pass the matching model=... name.")
    return traverse_util.unflatten_dict(flat)
