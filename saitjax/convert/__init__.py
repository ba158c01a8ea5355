"""Checkpoint conversion: timm/DeiT (and method) checkpoints <-> saitjax params (and BatchNorm statistics)."""

from saitjax.convert.io import (load_params, load_variables, read_npz, read_npz_variables, read_state_dict,
                                save_params, save_variables)
from saitjax.convert.timm_deit import (ConversionError, convert_state_dict, convert_variables, guess_model_name,
                                       stateful_collections)

__all__ = ["ConversionError", "convert_state_dict", "convert_variables", "guess_model_name", "load_params",
           "load_variables", "read_npz", "read_npz_variables", "read_state_dict", "save_params", "save_variables",
           "stateful_collections"]
