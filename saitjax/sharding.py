"""Where parameters and optimizer state live: replicated, or sharded over the data axis (FSDP).

``compute.param_sharding``:

* ``"replicated"`` (default): every device holds everything (plain data parallelism).
* ``"fsdp"``: each parameter of at least ``compute.fsdp_min_size`` elements is split over the
  ``data`` axis along its largest dimension that the device count divides; XLA gathers it for
  the forward/backward and reduce-scatters its gradient. Adam's moments follow their parameter,
  so a device holds ~1/n of params + optimizer state: models that do not fit as replicas train.

``compute.sharding_rules`` (both modes) pins parameters by regex over "/"-joined paths, first
match wins: ``(("blocks_.*/mlp/fc1/kernel", (None, "data")), ("pos_embed", ()))``, where the spec
names a mesh axis (or ``None``) per dimension, ``()`` = replicated. Checkpoints do not record
shardings: any checkpoint restores under any mode and device count (tested).
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from saitjax.parallel import DATA_AXIS

MODES = ("replicated", "fsdp")


def _path(keys: Sequence[Any]) -> tuple[str, ...]:
    return tuple(str(k.key) for k in keys if isinstance(k, jax.tree_util.DictKey))


def fsdp_spec(shape: Sequence[int], devices: int, min_size: int) -> P:
    """Shard the largest dimension ``devices`` divides (ties: the last), if the array is big enough."""
    if devices == 1 or math.prod(shape) < min_size:
        return P()
    dims = [i for i, d in enumerate(shape) if d % devices == 0]
    if not dims:
        return P()
    dim = max(dims, key=lambda i: (shape[i], i))
    return P(*([None] * dim + [DATA_AXIS]))


def check_rules(rules: Sequence[Any], field: str = "compute.sharding_rules") -> None:
    for i, rule in enumerate(rules):
        ok = (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)
              and isinstance(rule[1], (tuple, list)) and all(a is None or a == DATA_AXIS for a in rule[1]))
        if not ok:
            raise ValueError(f"invalid config: {field}[{i}]={rule!r} must be a (regex, spec) pair, spec a tuple "
                             f"of {DATA_AXIS!r} or None per dimension, e.g. ('head/kernel', (None, {DATA_AXIS!r}))")
        try:
            re.compile(rule[0])
        except re.error as err:
            raise ValueError(f"invalid config: {field}[{i}] regex {rule[0]!r}: {err}") from None


def param_specs(params: Any, mesh: Mesh, mode: str = "replicated", rules: Sequence[Any] = (),
                min_size: int = 2 ** 14) -> Any:
    """A ``PartitionSpec`` per parameter (arrays or ``ShapeDtypeStruct``s), by rules then mode."""
    if mode not in MODES:
        raise ValueError(f"invalid config: compute.param_sharding={mode!r}: choose replicated or fsdp")
    check_rules(rules)
    devices = mesh.shape[DATA_AXIS]
    used = [False] * len(rules)

    def spec(path, leaf):
        name = "/".join(_path(path))
        for i, (regex, axes) in enumerate(rules):
            if re.search(regex, name):
                used[i] = True
                axes = tuple(axes)
                if len(axes) > len(leaf.shape) or any(
                        a is not None and leaf.shape[d] % devices for d, a in enumerate(axes)):
                    raise ValueError(f"invalid config: compute.sharding_rules[{i}] gives {name} {tuple(leaf.shape)} "
                                     f"the spec {axes}, which {devices} devices cannot split evenly")
                return P(*axes)
        return fsdp_spec(leaf.shape, devices, min_size) if mode == "fsdp" else P()

    specs = jax.tree_util.tree_map_with_path(spec, params)
    unused = [rules[i][0] for i, u in enumerate(used) if not u]
    if unused:
        raise ValueError(f"invalid config: compute.sharding_rules {unused} match no parameter "
                         "(names look like blocks_0/mlp/fc1/kernel)")
    return specs


def like_params(tree: Any, params: Any, param_shardings: Any, default: NamedSharding) -> Any:
    """Shardings for ``tree`` (an optimizer state): a leaf that is a copy of a parameter (Adam's
    moments: its key path ends with the parameter's, same shape) gets that parameter's sharding;
    anything else (counts, scalars) ``default``."""
    shapes = {_path(p): leaf.shape for p, leaf in jax.tree_util.tree_leaves_with_path(params)}
    shardings = {_path(p): s for p, s in jax.tree_util.tree_leaves_with_path(param_shardings)}

    def pick(path, leaf):
        keys = _path(path)
        for start in range(len(keys)):
            suffix = keys[start:]
            if suffix in shardings and shapes[suffix] == tuple(leaf.shape):
                return shardings[suffix]
        return default

    return jax.tree_util.tree_map_with_path(pick, tree)


def describe(specs: Any) -> str:
    """One line for the log: how many parameter arrays are sharded."""
    leaves = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, P))
    sharded = sum(1 for s in leaves if any(a is not None for a in s))
    return f"{sharded} of {len(leaves)} parameter arrays sharded over {DATA_AXIS!r}"
