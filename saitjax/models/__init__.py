"""Linen models. Importing this package registers every model."""

from saitjax.models import asvit as _asvit  # noqa: F401  (registers AS-ViT names)
from saitjax.models import convnext as _convnext  # noqa: F401  (registers ConvNeXt names)
from saitjax.models import deit as _deit  # noqa: F401  (registers DeiT/ViT names)
from saitjax.models import dynamicvit as _dynamicvit  # noqa: F401  (registers DynamicViT names)
from saitjax.models import dynamicvit_spatial as _dynamicvit_spatial  # noqa: F401  (DynamicViT on ConvNeXt/Swin)
from saitjax.models import evit as _evit  # noqa: F401  (registers EViT names)
from saitjax.models import sait as _sait  # noqa: F401  (registers SaiT names)
from saitjax.models import stvit as _stvit  # noqa: F401  (registers STViT names)
from saitjax.models import stvitr as _stvitr  # noqa: F401  (registers STViT-R names)
from saitjax.models import swin as _swin  # noqa: F401  (registers Swin names)
from saitjax.models import tome as _tome  # noqa: F401  (registers ToMe names)
from saitjax.models.registry import create_model, list_models, model_entry, register_model
from saitjax.models.vit import TokenState, VisionTransformer

__all__ = ["create_model", "list_models", "model_entry", "register_model", "TokenState",
           "VisionTransformer"]
