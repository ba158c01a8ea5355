"""Shared pieces every model and method builds on: token operations, attention, buckets,
precision, LayerNorm, rematerialisation, predictors and spatial routing.

A method module (``saitjax.models.<method>``) imports from here and from the backbones
(``vit``, ``deit``, ``swin``, ``convnext``), never from another method.
"""
