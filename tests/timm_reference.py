"""Parity tests import timm through saitjax's helper and skip where torch/timm are absent."""

import pytest


def import_timm():
    """``(torch, timm)``, or skip the calling test."""
    pytest.importorskip("torch")
    from saitjax.convert.timm_import import import_timm as _import

    try:
        return _import()
    except ImportError as err:
        pytest.skip(f"timm not importable: {err}")
