"""Checkpoint conversion: timm/DeiT (and method) checkpoints <-> saitjax params."""

from saitjax.convert.io import load_params, read_npz, read_state_dict, save_params
from saitjax.convert.timm_deit import ConversionError, convert_state_dict, guess_model_name

__all__ = ["ConversionError", "convert_state_dict", "guess_model_name", "load_params", "read_npz",
           "read_state_dict", "save_params"]
