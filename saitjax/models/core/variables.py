"""A model's variables: ``params`` plus the state some layers keep (BatchNorm's ``batch_stats``).

Most models here have parameters only, and most code passes a params tree. STViT-R's stem keeps
BatchNorm running statistics, which evaluation reads and training updates (``mutable``). These
helpers let every caller take either form: a params tree, or ``{"params": ..., "batch_stats":
...}``.
"""

from __future__ import annotations

from typing import Any, Mapping

STATE_COLLECTIONS = ("batch_stats",)  # non-parameter collections a model may keep


def is_variables(tree: Any) -> bool:
    """True for ``{"params": ..., <state collections>}``, False for a bare params tree."""
    return (isinstance(tree, Mapping) and "params" in tree
            and set(tree) <= {"params", *STATE_COLLECTIONS})


def as_variables(tree: Any) -> dict[str, Any]:
    """``tree`` as the variables ``model.apply`` takes (a params tree is wrapped)."""
    return dict(tree) if is_variables(tree) else {"params": tree}


def split_variables(tree: Any) -> tuple[Any, dict[str, Any]]:
    """``(params, state)``: the state collections (empty for most models) apart from the params."""
    variables = as_variables(tree)
    return variables["params"], {k: v for k, v in variables.items() if k != "params"}
