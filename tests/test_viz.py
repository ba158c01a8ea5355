"""The viz functions write real PNGs; grey_out_pruned blends exactly the pruned patches."""

import os

import numpy as np
import pytest
from PIL import Image

from saitjax.metrics import MetricWriter
from saitjax.viz import grey_out_pruned, plot_count_histograms, plot_kept_tokens, plot_pareto, plot_training_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path, min_width=100, min_height=100):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size[0] >= min_width and image.size[1] >= min_height
        pixels = np.asarray(image.convert("L"))
    assert pixels.std() > 0  # Something was drawn.


def fake_run(workdir):
    with MetricWriter(str(workdir), tensorboard=False) as writer:
        for step in range(0, 300, 10):
            writer.write_scalars(step, {"loss": 3.0 / (1 + step / 50), "loss_ratio": 0.01,
                                        "lr": 1e-3 * min(1.0, step / 100)}, prefix="train/")
            if step % 100 == 90:
                writer.write_scalars(step, {"top1@dense": step / 400, "top1@mass0.9": step / 450,
                                            "loss": float("nan")}, prefix="eval/")
        writer.write_scalars(150, {"loss": 1.1}, prefix="train/")  # A resumed run repeats a step.


def test_training_curves_from_workdir(tmp_path):
    fake_run(tmp_path / "run")
    out = plot_training_curves(str(tmp_path / "run"), str(tmp_path / "plots" / "curves.png"),
                               title="deit_small")
    assert out == str(tmp_path / "plots" / "curves.png")
    assert_png(out, min_width=1000)  # Three panels side by side.


def test_training_curves_show_learned_thresholds_and_kept_fractions(tmp_path):
    records = [{"step": s, "train/loss": 1.0, "train/threshold_0": 0.01 + s * 1e-4, "train/threshold_1": 0.02,
                "train/kept_fraction_0": 0.9 - s / 400, "train/kept_fraction_1": 0.6} for s in range(0, 200, 10)]
    out = plot_training_curves(records, str(tmp_path / "curves.png"))
    with Image.open(out) as image:
        assert image.size[0] >= 1500  # loss, kept fractions and thresholds side by side


def test_count_histograms(tmp_path):
    rows = [{"density": "learned:1", "count_histogram": [0, 2, 5, 9, 4, 0]},
            {"density": "learned:1.5", "count_histogram": [3, 9, 6, 2, 0, 0]}]
    assert_png(plot_count_histograms(rows, str(tmp_path / "counts.png")))
    with pytest.raises(ValueError, match="count_histogram"):
        plot_count_histograms([], str(tmp_path / "none.png"))


def test_training_curves_missing_keys(tmp_path):
    only_loss = [{"step": s, "train/loss": 1.0 / (s + 1) + 0.1 * (s % 3)} for s in range(150)]
    assert_png(plot_training_curves(only_loss, str(tmp_path / "loss.png")))
    only_eval = [{"step": 100, "eval/top1": 0.5}, {"step": 200, "eval/top1": "nan"}]
    assert_png(plot_training_curves(only_eval, str(tmp_path / "eval.png")))
    assert_png(plot_training_curves([{"step": 1, "time": 0.0}], str(tmp_path / "empty.png")))
    assert_png(plot_training_curves([], str(tmp_path / "none.png")))


def sweep_rows(with_speed):
    rows = []
    for keep, top1 in ((1.0, 79.8), (0.9, 79.6), (0.7, 79.1), (0.5, 77.0)):
        row = {"spec": "dense" if keep == 1.0 else f"keep {keep}", "gflops": 4.6 * keep,
               "top1": top1, "rule": "topk"}
        if with_speed:
            row["img_per_s"] = 1000 / keep
        rows.append(row)
    return rows


@pytest.mark.parametrize("with_speed", [False, True])
def test_pareto(tmp_path, with_speed):
    out = plot_pareto(sweep_rows(with_speed), str(tmp_path / "pareto.png"), title="sweep")
    assert_png(out)
    with Image.open(out) as image:
        width = image.size[0]
    assert (width > 1000) == with_speed  # The img/s panel doubles the width.


def test_pareto_groups_and_errors(tmp_path):
    rows = sweep_rows(True) + [dict(r, rule="mass", top1=r["top1"] + 0.2)
                               for r in sweep_rows(True)]
    assert_png(plot_pareto(rows, str(tmp_path / "groups.png"), group="rule"))
    with pytest.raises(ValueError, match="gflops"):
        plot_pareto([{"top1": 1.0}], str(tmp_path / "none.png"))


def test_grey_out_pruned_exact_blend():
    rng = np.random.default_rng(0)
    image = rng.random((32, 48, 3))  # 2 x 3 patches of 16 px.
    mask = np.array([[1, 0, 1], [0, 0, 1]])
    out = grey_out_pruned(image, mask.reshape(-1), patch_size=16)
    assert out.shape == image.shape and out.dtype == image.dtype
    for i in range(2):
        for j in range(3):
            patch = np.s_[16 * i:16 * (i + 1), 16 * j:16 * (j + 1)]
            if mask[i, j]:
                np.testing.assert_array_equal(out[patch], image[patch])
            else:
                np.testing.assert_allclose(out[patch], image[patch] + 0.7 * (0.5 - image[patch]),
                                           rtol=0, atol=1e-12)
                # 70 % of the way to grey: the distance to 0.5 shrinks by exactly 0.3.
                np.testing.assert_allclose(np.abs(out[patch] - 0.5),
                                           0.3 * np.abs(image[patch] - 0.5), atol=1e-12)
    assert not np.shares_memory(out, image)


def test_grey_out_pruned_uint8_strength_and_remainder():
    image = np.full((20, 20, 3), 255, dtype=np.uint8)  # 16 px patches: one patch + remainder.
    out = grey_out_pruned(image, np.array([0]), patch_size=16, strength=1.0)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out[:16, :16], 0.5)
    np.testing.assert_array_equal(out[16:, :], 1.0)  # Past the last whole patch: unchanged.
    np.testing.assert_array_equal(out[:, 16:], 1.0)
    untouched = grey_out_pruned(image, np.array([[1]]), patch_size=16)
    np.testing.assert_array_equal(untouched, 1.0)
    with pytest.raises(ValueError, match="patches"):
        grey_out_pruned(image, np.ones(4), patch_size=16)


def test_plot_kept_tokens(tmp_path):
    rng = np.random.default_rng(1)
    images = (rng.random((10, 64, 64, 3)) * 255).astype(np.uint8)
    grid = 64 // 16
    dense = np.ones((10, grid * grid), dtype=np.int32)
    sparse = (rng.random((10, grid * grid)) < 0.4).astype(np.int32)
    out = plot_kept_tokens(images, [dense, sparse], ["dense", "mass 0.9 (41% tokens)"],
                           str(tmp_path / "kept.png"), patch_size=16, max_images=4)
    assert_png(out)
    with Image.open(out) as image:
        width, height = image.size
    assert width > height  # 4 columns, 2 rows.
    float_images = images.astype(np.float32) / 255.0
    assert_png(plot_kept_tokens(float_images[:2], [sparse[:2]], ["one"],
                                str(tmp_path / "float.png"), patch_size=16))
    with pytest.raises(ValueError, match="row labels"):
        plot_kept_tokens(images, [dense], ["a", "b"], str(tmp_path / "x.png"), patch_size=16)


def test_paint_token_groups_shows_merged_fused_and_discarded_patches(tmp_path):
    from saitjax.viz import paint_token_groups, plot_kept_tokens

    rng = np.random.default_rng(0)
    image = rng.uniform(size=(8, 8, 3)).astype(np.float32)  # 4 patches of 4 px
    source = np.array([1, 1, 2, -1])  # patches 0 and 1 merged, 2 alone, 3 discarded
    painted = paint_token_groups(image, source, 4)
    merged_colour = image[:4, :8].reshape(-1, 3).mean(0)
    np.testing.assert_allclose(painted[:4, :8], np.broadcast_to(merged_colour, (4, 8, 3)), rtol=1e-5)
    np.testing.assert_array_equal(painted[4:, :4], image[4:, :4])
    np.testing.assert_allclose(painted[4:, 4:], image[4:, 4:] + 0.7 * (0.5 - image[4:, 4:]), rtol=1e-6)
    out = plot_kept_tokens(image[None], [np.array([[1, 1, 1, 0]])], ["tome:1"], str(tmp_path / "g.png"),
                           patch_size=4, sources=[source[None]])
    assert os.path.getsize(out) > 0
