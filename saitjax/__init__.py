"""saitjax: token-sparse Vision Transformers in JAX/Flax.

    import saitjax
    model = saitjax.create_model("deit_small_patch16_224")
    params = saitjax.load_params("deit_small.npz", model="deit_small_patch16_224")
    logits, aux = model.apply({"params": params}, images,
                              sparsity=saitjax.SparsitySpec.hierarchical(0.7))
"""

from saitjax.models import create_model, list_models, model_entry
from saitjax.sparsity import SparsityError, SparsitySpec, parse_density

__version__ = "0.1.0"


def __getattr__(name):
    # Conversion pulls in safetensors (and torch for .pth): import it on first use only.
    if name in ("load_params", "save_params", "load_variables", "save_variables"):
        from saitjax.convert import io
        return getattr(io, name)
    raise AttributeError(f"module 'saitjax' has no attribute {name!r}")


__all__ = ["create_model", "list_models", "model_entry", "SparsitySpec", "SparsityError", "parse_density",
           "load_params", "save_params", "load_variables", "save_variables", "__version__"]
