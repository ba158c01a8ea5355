"""Registry: names, overrides and errors."""

from __future__ import annotations

import pytest

import saitjax


def test_list_models_patterns_and_tags():
    names = saitjax.list_models()
    assert names == sorted(names)
    assert {"deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224",
            "deit_small_distilled_patch16_224"} <= set(names)
    assert saitjax.list_models("deit_*_distilled_*") == [
        "deit_base_distilled_patch16_224", "deit_small_distilled_patch16_224",
        "deit_tiny_distilled_patch16_224"]
    assert set(saitjax.list_models(tag="test")) >= {"vit_test_patch4_32"}


def test_create_model_with_overrides():
    model = saitjax.create_model("deit_small_patch16_224", num_classes=10, drop_path_rate=0.1)
    assert (model.num_classes, model.embed_dim, model.depth, model.drop_path_rate) == (10, 384, 12, 0.1)
    assert saitjax.model_entry("deit_small_patch16_224").timm_name == "deit_small_patch16_224"


def test_unknown_model_suggests_close_names():
    with pytest.raises(ValueError, match="Did you mean deit_small_patch16_224"):
        saitjax.create_model("deit_smal_patch16_224")
    with pytest.raises(ValueError, match="unknown model 'resnet50'"):
        saitjax.create_model("resnet50")


def test_unknown_override_lists_valid_fields():
    with pytest.raises(TypeError, match=r"no field\(s\) \['width'\].*embed_dim"):
        saitjax.create_model("deit_small_patch16_224", width=128)
