"""EViT: token schedule and FLOPs of the official code, the fused token, the warm-up method."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import saitjax
from saitjax.flops import analytic_gmacs
from saitjax.methods.evit import quantise_up, warmup_keep_rate
from saitjax.sparsity import SparsityError, SparsitySpec, parse_density


pytestmark = pytest.mark.usefixtures("fast_xla")  # compares programs compiled under the same setting


@pytest.mark.parametrize("text, mlp_tokens, gmacs", [
    # methods-more.md §2.1 (confirmed by running the official code at 0.7)
    ("evit:0.9@3/6/9", (179, 163, 148), 4.02),
    ("evit:0.7@3/6/9", (140, 100, 72), 3.03),
    ("evit:0.5@3/6/9", (100, 52, 28), 2.31),
    ("evit:0.7@3/6/9,fuse=0", (139, 98, 69), 3.00),
])
def test_deit_small_schedule_and_gmacs_match_the_official_code(text, mlp_tokens, gmacs):
    model = saitjax.create_model("evit_deit_small_patch16_224")
    spec = parse_density(text)
    counts = model.block_token_counts(spec)
    assert tuple(counts[i][1] for i in (3, 6, 9)) == mlp_tokens
    assert counts[3][0] == 197 and counts[6][0] == mlp_tokens[0]  # attention sees the previous count
    assert round(analytic_gmacs(model, spec), 2) == gmacs


def test_fused_token_is_the_attention_weighted_sum_of_the_dropped_tokens():
    model = saitjax.create_model("evit_test_patch4_32", drop_loc=(1,), keep_rate=0.5)
    params = model.init(jax.random.key(1), jnp.zeros((1, 32, 32, 3)))["params"]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 65, 32)).astype(np.float32)
    cls_attn = rng.dirichlet(np.ones(65), size=(2, 2)).astype(np.float32)  # [B, H, N]
    state = saitjax.models.TokenState.initial(jnp.asarray(x), 1)
    new, stage_aux = model.apply(
        {"params": params}, method=lambda m: m.reduce_in_block(1, state, {"cls_attn": jnp.asarray(cls_attn)},
                                                               m.default_sparsity(), False))
    a = cls_attn[:, :, 1:].mean(1)
    for b in range(2):
        keep = np.argsort(-a[b], kind="stable")[:32]
        dropped = np.setdiff1d(np.arange(64), keep)
        np.testing.assert_allclose(np.asarray(new.x)[b, 1:33], x[b, 1 + keep], rtol=1e-6)
        np.testing.assert_allclose(np.asarray(new.x)[b, -1], (a[b, dropped, None] * x[b, 1 + dropped]).sum(0),
                                   rtol=1e-4, atol=1e-6)
        assert set(np.flatnonzero(np.asarray(stage_aux["keep_masks"])[b])) == set(keep.tolist())
        # every dropped patch now lives in the fused token, which stands for all of them
        np.testing.assert_array_equal(np.asarray(new.source)[b, dropped], 33)
        assert float(new.size[b, -1]) == 32.0


def test_distilled_model_protects_the_distillation_token():
    model = saitjax.create_model("evit_test_distilled_patch4_32")
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    params = model.init(jax.random.key(1), images)["params"]
    logits, aux = model.apply({"params": params}, images)
    np.testing.assert_allclose(logits, (aux["logits_cls"] + aux["logits_dist"]) / 2, rtol=1e-6)
    # 64 patches: ceil(0.7 * 64) = 45 (+1 fused), then ceil(0.7 * 46) = 33 (+1 fused); 2 prefix tokens
    assert aux["tokens"].shape[1] == 2 + 33 + 1
    assert np.all(np.asarray(aux["source"]) >= 2)  # no patch lives in the CLS or distillation slot


def test_warmup_schedule_is_quantised_to_a_few_compilations():
    rates = {quantise_up(warmup_keep_rate(e / 10, 0.7, 1.0, 10.0), 0.7, 0.05) for e in range(0, 150)}
    assert rates == {1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7}
    assert warmup_keep_rate(0.5, 0.7, 1.0, 10.0) == 1.0 and warmup_keep_rate(11.0, 0.7, 1.0, 10.0) == 0.7
    assert warmup_keep_rate(6.0, 0.7, 1.0, 10.0) == pytest.approx(0.85)
    assert quantise_up(0.7000000001, 0.7, 0.05) == 0.7 and quantise_up(0.71, 0.7, 0.05) == 0.75


def test_evit_specs_and_errors():
    assert SparsitySpec.evit(0.7).describe() == "evit:0.7@3/6/9"
    assert parse_density("evit:1@3/6/9").is_dense
    with pytest.raises(SparsityError, match="no 'mask' mode"):
        SparsitySpec.evit(0.7).with_mode("mask")
    model = saitjax.create_model("evit_test_patch4_32")
    images = jnp.zeros((1, 32, 32, 3))
    params = model.init(jax.random.key(0), images)["params"]
    with pytest.raises(SparsityError, match="rule 'evit'"):
        model.apply({"params": params}, images, sparsity=parse_density("topk:0.5@1"))
    with pytest.raises(SparsityError, match="do not exist"):
        model.apply({"params": params}, images, sparsity=parse_density("evit:0.5@4"))
