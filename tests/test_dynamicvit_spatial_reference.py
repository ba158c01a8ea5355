"""Self-checks of the PyTorch DynamicSwin / DynamicCNN reference (``dynamicvit_spatial_reference``):
the official slow-path counts, inference at every batch size, the official state-dict keys, and
that with every ratio 1.0 the routed network is the dense one. Skipped without torch."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import dynamicvit_spatial_reference as ref  # noqa: E402  (after the importorskip)

pytestmark = pytest.mark.torch

IMG = 32  # test sizes: stage-3 map 2x2 for both models


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread while this module runs: on a shared 2-core machine torch's pool made each
    tiny op take ~8 ms (100x slower); restored afterwards for the other torch tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _images(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def _models(base_rate: float = 0.7) -> list[torch.nn.Module]:
    torch.manual_seed(0)
    return [ref.perturb_(ref.dynamic_swin("test", base_rate)).eval(),
            ref.perturb_(ref.dynamic_convnext("test", base_rate)).eval()]


@pytest.mark.parametrize("base_rate, expected", [(0.7, [137, 97, 58]), (0.9, [176, 137, 98])])
def test_slow_counts_on_14x14(base_rate, expected):
    ratios = ref.sparse_ratios(base_rate)
    assert ref.slow_counts(196, ratios) == expected
    # the predictors themselves, on a 14x14 map
    torch.manual_seed(0)
    swin_pred, cnn_pred = ref.SwinPredictor(32).eval(), ref.ConvNeXtPredictor(32).eval()
    with torch.no_grad():
        for r, n in zip(ratios, expected):
            _, (slow, fast) = swin_pred(torch.randn(2, 196, 32), None, r)
            assert slow.shape == (2, n) and fast.shape == (2, 196 - n)
            _, (slow, fast) = cnn_pred(torch.randn(2, 32, 14, 14), None, r)
            assert slow.shape == (2, n) and fast.shape == (2, 196 - n)
            assert torch.equal(torch.sort(torch.cat([slow, fast], 1), 1).values, torch.arange(196).expand(2, -1))


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_eval_forward_every_batch_size(batch):
    """Batch 2 included: the official Swin crashes there (``len(x) == 2``), the reference must not."""
    images = _images(batch)
    with torch.no_grad():
        for model in _models():
            logits = model(images)
            assert logits.shape == (batch, 10) and torch.isfinite(logits).all()
            assert [d[0].shape[1] for d in model.last_decisions] == [2, 1, 1]  # int(4 * r), r = .7, .5-, .3-
            # per-sample rows are independent of the batch they are in
            alone = torch.cat([model(images[i:i + 1]) for i in range(batch)])
            torch.testing.assert_close(logits, alone, rtol=1e-5, atol=1e-5)


def test_official_state_dict_keys():
    swin, cnn = (m.state_dict() for m in _models())
    assert "layers.0.downsample.reduction.weight" in swin and "layers.3.downsample.norm.weight" not in swin
    assert "layers.0.blocks.1.attn_mask" in swin and "layers.0.blocks.0.attn.relative_position_index" in swin
    assert swin["layers.2.downsample.reduction.weight"].shape == (256, 512)
    assert not any("fastmlp" in k for k in swin if not k.startswith("layers.2.blocks."))
    assert "layers.2.blocks.0.fastmlp.fc1.0.weight" not in swin  # block 0 is before pruning_loc[0] = 1
    for j in (1, 2, 3):
        assert swin[f"layers.2.blocks.{j}.fastmlp.fc1.0.weight"].shape == (128,)  # LayerNorm
        assert swin[f"layers.2.blocks.{j}.fastmlp.fc1.1.weight"].shape == (128, 128)
    for s in range(3):
        p = f"layers.2.score_predictor.{s}."
        assert swin[p + "in_conv.0.weight"].shape == (128,) and swin[p + "in_conv.1.weight"].shape == (128, 128)
        assert [swin[p + f"out_conv.{k}.weight"].shape for k in (0, 2, 4)] == [(64, 128), (32, 64), (2, 32)]
    assert {"patch_embed.proj.weight", "patch_embed.norm.weight", "norm.weight", "head.weight"} <= set(swin)
    assert not any(k.startswith("score_predictor") for k in swin)
    ln = ref.dynamic_swin("test").get_submodule("layers.2.score_predictor.0.in_conv.0")
    assert type(ln) is torch.nn.LayerNorm and ln.eps == 1e-5

    assert cnn["downsample_layers.0.0.weight"].shape == (16, 3, 4, 4)  # stem conv, then channels-first LN
    assert cnn["downsample_layers.0.1.weight"].shape == (16,)
    assert cnn["downsample_layers.3.0.weight"].shape == (64,)  # LN, then the 2x2 stride-2 conv
    assert cnn["downsample_layers.3.1.weight"].shape == (128, 64, 2, 2)
    assert cnn["stages.2.0.dwconv.weight"].shape == (64, 1, 7, 7) and "stages.2.0.gamma" in cnn
    assert "stages.2.0.fast_path.0.weight" not in cnn
    for j in (1, 2, 3):
        assert cnn[f"stages.2.{j}.fast_path.0.weight"].shape == (64,)
        assert cnn[f"stages.2.{j}.fast_path.1.weight"].shape == (64, 64)
        assert cnn[f"stages.2.{j}.fast_path_gamma"].shape == (64,)
    for s in range(3):
        p = f"score_predictor.{s}."
        assert cnn[p + "in_conv.0.weight"].shape == (64,) and cnn[p + "in_conv.1.weight"].shape == (64, 64, 1, 1)
        assert [cnn[p + f"out_conv.{k}.weight"].shape for k in (0, 2, 4)] == [(32, 64, 1, 1), (16, 32, 1, 1),
                                                                               (2, 16, 1, 1)]
    assert not any("fast_path" in k for k in cnn if not k.startswith("stages.2."))
    assert {"norm.weight", "head.weight"} <= set(cnn)


def test_official_sizes_count_as_main_py():
    """Key layout at full size without building weights twice: only the stage-3 extras are checked."""
    with torch.device("meta"):
        swin_s = ref.dynamic_swin("small")
        cnn_b = ref.dynamic_convnext("base")
    assert swin_s.layers[2].pruning_loc == [2, 4, 6] and len(swin_s.layers[2].blocks) == 18
    assert [b.ada for b in swin_s.layers[2].blocks] == [False, False] + [True] * 16
    assert cnn_b.pruning_loc == [3, 6, 9] and cnn_b.sparse_ratio == ref.sparse_ratios(0.7)
    assert sum(b.ada for b in cnn_b.stages[2]) == 24 and cnn_b.head.weight.shape == (1000, 1024)


def test_ratio_one_is_the_dense_network():
    """Every ratio 1.0: every location on the slow path, so the routed eval forward is the dense one."""
    images = _images(3)
    with torch.no_grad():
        for model in _models():
            dense_logits, _ = model.forward_dense(images)
            (model.layers[2] if hasattr(model, "layers") else model).sparse_ratio = [1.0] * 3
            torch.testing.assert_close(model(images), dense_logits, rtol=1e-5, atol=1e-5)
            assert all(d[1].shape[1] == 0 for d in model.last_decisions)


def test_teacher_is_the_dense_network():
    """``teacher=True`` (the official *_Teacher layout) loaded from a student's dense keys = ``forward_dense``."""
    images = _images(2)
    for model, build in zip(_models(), (ref.dynamic_swin, ref.dynamic_convnext)):
        teacher = build("test", teacher=True).eval()
        sd = model.state_dict()
        teacher.load_state_dict({k: v for k, v in sd.items() if k in teacher.state_dict()})
        assert not any("fast" in k or "predictor" in k for k in teacher.state_dict())
        with torch.no_grad():
            t_logits, t_feat = teacher(images)
            d_logits, d_feat = model.forward_dense(images)
        torch.testing.assert_close(t_logits, d_logits)
        torch.testing.assert_close(t_feat, d_feat)


def test_train_forward_outputs_and_given_noise():
    images = _images(2)
    for model, (h, w, c) in zip(_models(), ((2, 2, 256), (2, 2, 128))):
        model.train()
        noise = [-torch.empty(2, h * w, 2).exponential_(generator=torch.Generator().manual_seed(s)).log()
                 for s in range(3)]
        with torch.no_grad():
            logits, featmap, decisions = model(images, gumbel_noise=noise)
            again = model(images, gumbel_noise=noise)
        assert logits.shape == (2, 10) and len(decisions) == 3
        torch.testing.assert_close(again[0], logits, rtol=0, atol=0)
        if hasattr(model, "layers"):  # Swin: featmap [B, L, C] at the last stage; masks [B, N, 1]
            assert featmap.shape == (2, 1, c) and decisions[0].shape == (2, h * w, 1)
        else:  # ConvNeXt: featmap kept [B, H, W, C] as official; masks [B, 1, H, W]
            assert featmap.shape == (2, 1, 1, c) and decisions[0].shape == (2, 1, h, w)
        for d in decisions:
            assert set(d.unique().tolist()) <= {0.0, 1.0}
        # drawn noise (the official path) runs too
        assert len(model(images)) == 3


def test_hard_gumbel_matches_torch_with_the_same_draws():
    logits = torch.randn(4, 9, 2).log_softmax(-1)
    torch.manual_seed(3)
    expected = torch.nn.functional.gumbel_softmax(logits, hard=True, dim=2)
    torch.manual_seed(3)
    noise = -torch.empty_like(logits).exponential_().log()
    torch.testing.assert_close(ref.hard_gumbel(logits, 2, noise), expected, rtol=0, atol=0)


def test_train_streams_equal_eval_when_the_mask_is_the_eval_selection():
    """One predictor, Gumbel noise forcing the eval top-k set: the official two-stream training forward
    then computes exactly the gather/scatter inference (checks the stream mixing of both block kinds).
    With several predictors the two differ where a later mask flips a location (stale stream values)."""
    images = _images(2, seed=1)
    for build in (ref.dynamic_swin, ref.dynamic_convnext):
        torch.manual_seed(1)
        model = ref.perturb_(build("test", pruning_loc=(1,), sparse_ratio=[0.5])).eval()
        with torch.no_grad():
            expected = model(images)
            slow = model.last_decisions[0][0]
            noise = torch.zeros(2, 4, 2)
            noise[:, :, 1] = 1e3
            noise[torch.arange(2)[:, None], slow, 0], noise[torch.arange(2)[:, None], slow, 1] = 1e3, 0.0
            logits, _, decisions = model.train()(images, gumbel_noise=[noise])
        assert decisions[0].sum().item() == 2 * slow.shape[1]
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
