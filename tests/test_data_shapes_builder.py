"""The generated `saitjax_shapes` TFDS dataset and the numpy patch-mask helpers."""

import glob
import os

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from saitjax.data import object_masks  # noqa: E402
from saitjax.data import shapes_builder as sb  # noqa: E402

NUM_CLASSES = len(sb.CLASS_NAMES)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds_shapes"))
    sb.build_shapes_dataset(data_dir, "tiny")
    return data_dir


def _records(data_dir):
    pattern = os.path.join(data_dir, "saitjax_shapes", "tiny", "1.0.0", "*.tfrecord*")
    files = sorted(glob.glob(pattern))
    assert len(files) >= 2
    return {os.path.basename(f): open(f, "rb").read() for f in files}


def _split(data_dir, split):
    builder = tfds.builder("saitjax_shapes/tiny", data_dir=data_dir)
    return list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))


def test_configs_and_info(tiny_dir):
    builder = tfds.builder("saitjax_shapes/tiny", data_dir=tiny_dir)
    assert builder.is_prepared()
    assert str(builder.info.version) == "1.0.0"
    assert "1.0.0" in builder.RELEASE_NOTES
    assert builder.info.splits["train"].num_examples == 512
    assert builder.info.splits["test"].num_examples == 128
    assert builder.info.features["label"].names == list(sb.CLASS_NAMES)
    assert NUM_CLASSES >= 6
    configs = {c.name: c for c in sb.SaitjaxShapes.BUILDER_CONFIGS}
    assert (configs["default"].image_size, configs["default"].num_train,
            configs["default"].num_test) == (64, 10_000, 2_000)
    assert (configs["tiny"].image_size, configs["tiny"].num_train,
            configs["tiny"].num_test) == (32, 512, 128)


def test_build_is_idempotent(tiny_dir):
    before = _records(tiny_dir)
    mtimes = {f: os.path.getmtime(f) for f in glob.glob(os.path.join(tiny_dir, "**", "*"),
                                                        recursive=True)}
    builder = sb.build_shapes_dataset(tiny_dir, "tiny")   # must not regenerate or overwrite
    assert builder.is_prepared()
    assert _records(tiny_dir) == before
    for f, t in mtimes.items():
        assert os.path.getmtime(f) == t


def test_deterministic_bytes(tiny_dir, tmp_path):
    sb.build_shapes_dataset(str(tmp_path), "tiny")
    assert _records(str(tmp_path)) == _records(tiny_dir)
    # Any single example can be regenerated from (seed, split, index) alone.
    a = sb.generate_example(0, "test", 7, 32)
    b = sb.generate_example(0, "test", 7, 32)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    c = sb.generate_example(1, "test", 7, 32)
    assert not np.array_equal(a[1], c[1])
    d = sb.generate_example(0, "train", 7, 32)
    assert not np.array_equal(a[1], d[1])


@pytest.mark.parametrize("split,size", [("train", 512), ("test", 128)])
def test_examples(tiny_dir, split, size):
    examples = _split(tiny_dir, split)
    assert len(examples) == size
    labels = np.array([ex["label"] for ex in examples])
    assert set(labels.tolist()) == set(range(NUM_CLASSES))
    assert np.bincount(labels).min() >= size // NUM_CLASSES
    for ex in examples:
        image, mask, bbox = ex["image"], ex["mask"], ex["bbox"]
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8
        assert mask.shape == (32, 32, 1) and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 1}
        m = mask[..., 0].astype(bool)
        frac = m.mean()
        assert 0.01 <= frac <= 0.3, frac          # one object of 25-55 % of the side
        ys, xs = np.nonzero(m)
        np.testing.assert_allclose(bbox, [ys.min() / 32, xs.min() / 32, (ys.max() + 1) / 32,
                                          (xs.max() + 1) / 32], atol=1e-6)
        # The mask sits on the object: brighter (luma) than the background by a clear margin.
        luma = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        assert luma[m].mean() - luma[~m].mean() > 30


def test_mask_matches_class_geometry():
    """Fill ratio of the object's box per class: circles ~pi/4, hollow/pointy shapes lower."""
    ratios = {name: [] for name in sb.CLASS_NAMES}
    for i in range(16 * NUM_CLASSES):
        label, _, mask, bbox = sb.generate_example(3, "train", i, 64)
        y0, x0, y1, x1 = np.round(bbox * 64).astype(int)
        ratios[sb.CLASS_NAMES[label]].append(mask.sum() / ((y1 - y0) * (x1 - x0)))
    mean = {k: float(np.mean(v)) for k, v in ratios.items()}
    assert 0.70 < mean["circle"] < 0.85
    assert 0.45 < mean["ring"] < 0.62
    assert mean["star"] < mean["triangle"] < mean["circle"]
    assert mean["crescent"] < mean["circle"] and mean["hourglass"] < mean["square"]


def test_distractors_smaller_than_objects():
    assert sb.MAX_DISTRACTOR < sb.MIN_SIZE < sb.MAX_SIZE <= 0.6


def test_patch_mask_hand_made():
    mask = np.zeros((8, 8), np.uint8)
    mask[0:2, 0:2] = 1          # top-left patch: 4/16 = 0.25 -> object at min_fraction 0.25
    mask[0, 4:7] = 1            # top-right patch: 3/16 < 0.25
    mask[4:8, 0:4] = 1          # bottom-left: full
    expected = np.array([[True, False], [True, False]])
    np.testing.assert_array_equal(sb.patch_mask(mask, 4), expected)
    np.testing.assert_array_equal(sb.patch_mask(mask[..., None], 4), expected)
    np.testing.assert_array_equal(sb.patch_mask(mask, 4, min_fraction=0.5),
                                  [[False, False], [True, False]])
    np.testing.assert_array_equal(sb.patch_mask(mask, 4, min_fraction=0.1),
                                  [[True, True], [True, False]])
    np.testing.assert_allclose(object_masks.patch_fractions(mask[None], 4)[0],
                               [[0.25, 3 / 16], [1.0, 0.0]])
    with pytest.raises(ValueError, match="divisible"):
        sb.patch_mask(mask, 3)


def test_patch_masks_batched_matches_single():
    rng = np.random.default_rng(0)
    masks = (rng.random((5, 16, 16, 1)) < 0.3).astype(np.uint8)
    batched = sb.patch_masks(masks, 4, 0.25)
    assert batched.shape == (5, 4, 4) and batched.dtype == bool
    for i in range(5):
        np.testing.assert_array_equal(batched[i], sb.patch_mask(masks[i], 4, 0.25))
    flat = sb.patch_masks(masks[..., 0], 4, 0.25, flatten=True)
    assert flat.shape == (5, 16)
    np.testing.assert_array_equal(flat, batched.reshape(5, 16))   # row-major token order
