"""DynamicViT-Swin / -ConvNeXt against the PyTorch reference of the official code
(``dynamicvit_spatial_reference``): checkpoints in the official layout convert through the
converter and reproduce the official eval logits at batch 1, 2 and 3. Skipped without torch."""

from __future__ import annotations

import numpy as np
import pytest

import jax

torch = pytest.importorskip("torch")

import dynamicvit_spatial_reference as ref  # noqa: E402  (after the importorskip)

import saitjax  # noqa: E402
from saitjax.convert import convert_state_dict, guess_model_name  # noqa: E402

pytestmark = pytest.mark.torch

# Swin at 128 px with window 4: an 8x8 stage-3 map, so routed blocks also run shifted windows.
SWIN_GEOMETRY = dict(img_size=128, patch_size=4, window_size=4, embed_dim=32, depths=(2, 2, 4, 2),
                     num_heads=(2, 4, 8, 16), num_classes=10)
CASES = {
    "swin": ("dynamicvit_swin_test_patch4_window4_64", dict(SWIN_GEOMETRY), 128,
             lambda rate: ref.dynamic_swin("test", rate, **SWIN_GEOMETRY)),
    "convnext": ("dynamicvit_convnext_test", {}, 64, lambda rate: ref.dynamic_convnext("test", rate)),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops on a shared 2-core machine: the pool only adds latency
    yield
    torch.set_num_threads(threads)


def _state_dict(module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("rate", [0.7, pytest.param(0.9, marks=pytest.mark.extended)])
@pytest.mark.parametrize("case", list(CASES))
def test_official_layout_converts_and_reproduces_the_official_logits(case, rate):
    name, overrides, size, build = CASES[case]
    torch.manual_seed(0)
    official = ref.perturb_(build(rate), seed=1).eval()
    model = saitjax.create_model(name, keep_rho=rate, **overrides)
    params = convert_state_dict(_state_dict(official), model, model_name=name)
    images = np.random.default_rng(2).normal(size=(3, size, size, 3)).astype(np.float32)
    with torch.inference_mode():
        expected = official(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    apply = jax.jit(lambda p, x: model.apply({"params": p}, x))
    logits = np.asarray(apply(params, images)[0])
    assert np.abs(logits - expected).max() < 1e-4
    for batch in (1, 2):  # the official Swin model fails at batch 2; the port and the reference do not
        with torch.inference_mode():
            part = official(torch.from_numpy(images[:batch].transpose(0, 3, 1, 2))).numpy()
        assert np.abs(np.asarray(apply(params, images[:batch])[0]) - part).max() < 1e-4
    # the slow sets themselves are the official ones
    _, aux = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, images)
    with torch.inference_mode():
        official(torch.from_numpy(images.transpose(0, 3, 1, 2)))
    for ours, (slow, _) in zip(aux["slow_indices"], official.last_decisions):
        np.testing.assert_array_equal(np.sort(np.asarray(ours), 1), np.sort(slow.numpy(), 1))


@pytest.mark.parametrize("backbone", ["swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224",
                                      "convnext_tiny", "convnext_base"])
def test_official_checkpoints_are_recognised_and_fit_the_registered_models(backbone):
    kind, size = backbone.split("_")[:2]
    with torch.device("meta"):
        official = (ref.dynamic_swin if kind == "swin" else ref.dynamic_convnext)(size)
    shaped = {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in official.state_dict().items()}
    assert guess_model_name(shaped) == f"dynamicvit_{backbone}"
    model = saitjax.create_model(f"dynamicvit_{backbone}")
    params = convert_state_dict(shaped, model, model_name=backbone)  # every key placed, nothing missing
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    assert count == sum(int(np.prod(v.shape)) for k, v in official.state_dict().items()
                        if not k.endswith(("relative_position_index", "attn_mask")))
