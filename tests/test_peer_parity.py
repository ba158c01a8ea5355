"""EViT, ToMe and AS-ViT against PyTorch references of their official code (fp32, 1e-4), through the convert CLI.

The references (``tests/evit_reference.py``, ``tests/tome_reference.py``,
``tests/asvit_reference.py``) re-implement the official forward passes (youweiliang/evit
``evit.py``; facebookresearch/ToMe ``merge.py`` and ``patch/timm.py``; Cydia2018/AS-ViT ``vit.py``)
on a timm DeiT. Here a random timm DeiT is saved as an official checkpoint
(``{"model": state_dict}`` .pth, timm keys), converted with ``python -m saitjax.tools.convert``,
loaded into the saitjax model, and both sides run on the same images.
"""

from __future__ import annotations

import numpy as np
import pytest

import jax

import saitjax
from saitjax.sparsity import SparsitySpec
from saitjax.tools import convert as convert_cli

from timm_reference import import_timm

pytestmark = pytest.mark.torch

NAMES = ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """timm DeiT-Ti models with random weights, each saved as an official ``{"model": ...}`` .pth."""
    torch, timm = import_timm()
    out = {}
    for seed, name in enumerate(NAMES):
        torch.manual_seed(seed)
        model = timm.create_model(name, pretrained=False).eval()
        with torch.no_grad():
            for key, p in model.named_parameters():
                p.add_(torch.randn_like(p) * 0.02)
                if "qkv.weight" in key:  # sharper attention: selections far from ties
                    p.mul_(4.0)
        path = tmp_path_factory.mktemp("ckpt") / f"{name}.pth"
        torch.save({"model": model.state_dict(), "epoch": 0}, path)
        images = np.random.default_rng(seed).normal(size=(2, 224, 224, 3)).astype(np.float32)
        out[name] = (model, str(path), images)
    return out


def _both_sides(checkpoints, timm_name: str, method: str, tmp_path, path: str | None = None, **overrides):
    """``(reference, images NHWC, images NCHW torch, saitjax model, params)``: the .pth at ``path``
    (default: the DeiT checkpoint) converted with the CLI into ``{method}_{timm_name}``."""
    torch, _ = import_timm()
    reference, deit_path, images = checkpoints[timm_name]
    model_name = timm_name.replace("deit_", f"{method}_deit_")
    npz = tmp_path / f"{model_name}.npz"
    assert convert_cli.main(["--src", path or deit_path, "--model", model_name, "--out", str(npz)]) == 0
    model = saitjax.create_model(model_name, **overrides)
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    return reference, images, x, model, saitjax.load_params(str(npz), model_name)


def _cases(default: list[tuple], extended: list[tuple]) -> list:
    """Parity cases: ``default`` in every run, ``extended`` only with ``-m extended`` (each case
    costs a 224 px PyTorch and JAX forward, ~10 s on 2 cores)."""
    return [*default, *(pytest.param(*case, marks=pytest.mark.extended) for case in extended)]


PLAIN, DISTILLED = NAMES


@pytest.mark.parametrize("timm_name, r, prop_attn", _cases(
    [(DISTILLED, 13, True)],
    [(PLAIN, 13, False), (PLAIN, 13, True), (DISTILLED, 13, False), (PLAIN, 0, True), (DISTILLED, 0, True), (PLAIN, 16, True), (DISTILLED, 16, True)]))
def test_tome_matches_the_official_forward(checkpoints, tmp_path, timm_name, r, prop_attn):
    import tome_reference

    reference, images, x, model, params = _both_sides(checkpoints, timm_name, "tome", tmp_path, prop_attn=prop_attn)
    expected, info = tome_reference.tome_forward(reference, x, r=r, prop_attn=prop_attn, return_info=True)
    logits, aux = jax.jit(lambda p, im: model.apply({"params": p}, im, sparsity=SparsitySpec.tome(r)))(params, images)
    np.testing.assert_allclose(np.asarray(logits), expected.numpy(), atol=1e-4, rtol=0)
    # the same merged groups: token sizes in the same (official) order
    np.testing.assert_allclose(np.asarray(aux["token_size"]), info["size"].numpy(), atol=1e-5)
    assert aux["tokens"].shape[1] == info["counts"][-1]


@pytest.mark.parametrize("timm_name, keep_rate, fuse", _cases(
    [(DISTILLED, 0.7, True), (PLAIN, 0.7, False)],
    [(PLAIN, 0.7, True), (DISTILLED, 0.7, False), *((name, rate, True) for name in NAMES for rate in (0.5, 1.0))]))
def test_evit_matches_the_official_forward(checkpoints, tmp_path, timm_name, keep_rate, fuse):
    import evit_reference

    reference, images, x, model, params = _both_sides(checkpoints, timm_name, "evit", tmp_path)
    expected, counts = evit_reference.evit_forward(reference, x, keep_rate=keep_rate, drop_loc=(3, 6, 9),
                                                   fuse_token=fuse, return_counts=True)
    spec = SparsitySpec.evit(keep_rate, (3, 6, 9), fuse)
    logits, aux = jax.jit(lambda p, im: model.apply({"params": p}, im, sparsity=spec))(params, images)
    np.testing.assert_allclose(np.asarray(logits), expected.numpy(), atol=1e-4, rtol=0)
    assert aux["tokens"].shape[1] == counts[-1]
    assert [mlp for _, mlp in model.block_token_counts(spec)] == counts
    if keep_rate == 1.0:  # the dense setting is the DeiT itself
        np.testing.assert_allclose(expected.numpy(), reference(x).detach().numpy(), atol=1e-4, rtol=0)


# Thresholds around the uniform score 1/196: every stage prunes some tokens but not all.
ASVIT_THRESHOLDS = (0.8 / 196, 1.0 / 196, 1.2 / 196)


@pytest.mark.parametrize("timm_name, batch_rule", _cases(
    [(PLAIN, "mean")], [(DISTILLED, "image"), (PLAIN, "image"), (DISTILLED, "mean")]))
def test_asvit_matches_the_official_forward(checkpoints, tmp_path, timm_name, batch_rule):
    """Official-layout checkpoint (thresholds as 0-d tensors) -> convert CLI -> same logits and kept sets.

    ``image``: each image alone (the official batch-1 rule) must equal the batched saitjax run;
    ``mean``: the official batch-2 rule, every image keeping floor(mean count).
    """
    import asvit_reference

    torch, _ = import_timm()
    path = tmp_path / "asvit.pth"
    torch.save({"model": asvit_reference.asvit_state_dict(checkpoints[timm_name][0], ASVIT_THRESHOLDS)}, path)
    reference, images, x, model, params = _both_sides(checkpoints, timm_name, "asvit", tmp_path, path=str(path),
                                                      batch_rule=batch_rule)
    np.testing.assert_allclose([float(params[f"score_predictor_{s}"]["keep_threshold"]) for s in range(3)],
                               ASVIT_THRESHOLDS, rtol=1e-6)
    expected, info = asvit_reference.asvit_forward(reference, x, thresholds=ASVIT_THRESHOLDS, pruning_loc=(4, 7, 10),
                                                   batch_rule=batch_rule, return_info=True)
    logits, aux = jax.jit(lambda p, im: model.apply({"params": p}, im))(params, images)
    np.testing.assert_allclose(np.asarray(logits), expected.numpy(), atol=1e-4, rtol=0)
    counts = np.stack([np.asarray(c) for c in aux["kept_counts"]])
    np.testing.assert_array_equal(counts, np.asarray(info["counts"]))
    assert (counts[0] > 0).all() and (counts[0] < 196).all(), f"thresholds must prune some tokens: {counts}"
    for s, kept in enumerate(info["kept"]):
        for b in range(len(images)):
            assert sorted(np.flatnonzero(np.asarray(aux["keep_masks"][s][b]))) == list(kept[b])
