"""tf.data pipelines (train/eval, exact eval, host shards, ImageFolder, errors), global batches,
DeiT preprocessing and RandAugment."""

import hashlib
import math

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
pytest.importorskip("tensorflow_datasets")

import jax  # noqa: E402
from PIL import Image, ImageEnhance, ImageOps  # noqa: E402

from saitjax.data import pipeline as P  # noqa: E402
from saitjax.data import preprocess as pp  # noqa: E402
from saitjax.data import randaugment as ra  # noqa: E402

NAME = "saitjax_shapes/tiny"
LO = min((0 - m) / s for m, s in zip(pp.IMAGENET_MEAN, pp.IMAGENET_STD))
HI = max((1 - m) / s for m, s in zip(pp.IMAGENET_MEAN, pp.IMAGENET_STD))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tfds"))
    P.open_dataset(NAME, data_dir=d)            # generated on first use, no network
    return d


def _eval(data_dir, split="test", batch=24, **kw):
    kw.setdefault("crop_pct", 1.0)
    ds = P.make_dataset(NAME, split, train=False, image_size=32, per_host_batch_size=batch,
                        data_dir=data_dir, **kw)
    return ds, list(ds.as_numpy_iterator())


def _hashes(batches):
    return [hashlib.sha1(np.ascontiguousarray(img).tobytes()).hexdigest()
            for b in batches for img, v in zip(b["image"], b["valid"]) if v]


# ----------------------------------------------------------------------------- pipelines

def test_train_batches(data_dir):
    kw = dict(train=True, image_size=32, per_host_batch_size=16, data_dir=data_dir,
              crop_scale=(0.35, 1.0), randaugment="rand-m9-mstd0.5-inc1", seed=3)
    batches = list(P.make_dataset(NAME, "train", **kw).take(3).as_numpy_iterator())
    for b in batches:
        assert b["image"].shape == (16, 32, 32, 3) and b["image"].dtype == np.float32
        assert b["label"].shape == (16,) and b["label"].dtype == np.int32
        assert b["valid"].dtype == bool and b["valid"].all()
        assert ((b["label"] >= 0) & (b["label"] < 8)).all()
        assert b["image"].min() >= LO - 1e-4 and b["image"].max() <= HI + 1e-4
        assert "mask" not in b
    assert batches[0]["image"].std() > 0.2          # normalised, not a constant
    again = next(P.make_dataset(NAME, "train", **kw).as_numpy_iterator())
    np.testing.assert_array_equal(again["image"], batches[0]["image"])   # reproducible
    other = next(P.make_dataset(NAME, "train", **{**kw, "seed": 4}).as_numpy_iterator())
    assert not np.array_equal(other["image"], batches[0]["image"])


@pytest.mark.parametrize("cache", [False, True])
def test_train_epochs_and_exact_resume(data_dir, cache):
    kw = dict(train=True, image_size=32, per_host_batch_size=48, data_dir=data_dir,
              crop_scale=(0.35, 1.0), cache=cache, seed=1)
    ds = P.make_dataset(NAME, "test", num_epochs=2, **kw)
    full = list(ds.as_numpy_iterator())
    assert len(full) == (2 * 128) // 48                   # drop_remainder=True
    # Each epoch visits every example once, in a different order.
    labels = np.concatenate([b["label"] for b in full])
    counts = np.bincount(labels[:128], minlength=8)
    assert counts.tolist() == [16] * 8
    # Resuming at step 3 (inside the second epoch) continues the identical stream.
    resumed = list(P.make_dataset(NAME, "test", num_epochs=2, start_step=3, **kw)
                   .as_numpy_iterator())
    assert len(resumed) == len(full) - 3
    for a, b in zip(resumed, full[3:]):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    forever = P.make_dataset(NAME, "test", **kw)          # num_epochs=None: never ends
    assert sum(1 for _ in forever.take(9)) == 9


def test_eval_is_exact_and_masks_line_up(data_dir):
    ds, batches = _eval(data_dir, batch=24, keep_mask=True)
    n_batches = P.num_eval_batches(NAME, "test", 24, data_dir=data_dir)
    assert n_batches == math.ceil(128 / 24) == len(batches) == int(ds.cardinality())
    valid = np.concatenate([b["valid"] for b in batches])
    assert valid.sum() == 128 and valid[:128].all() and not valid[128:].any()
    raw = P.open_dataset(NAME, data_dir=data_dir).builder.as_dataset(split="test")
    raw = list(raw.as_numpy_iterator())
    images = np.concatenate([b["image"] for b in batches])[:128]
    masks = np.concatenate([b["mask"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])[:128]
    assert masks.shape == (144, 32, 32) and masks.dtype == np.uint8 and not masks[128:].any()
    restored = images * np.array(pp.IMAGENET_STD) + np.array(pp.IMAGENET_MEAN)
    for i, ex in enumerate(raw):    # crop_pct=1 at the stored size: identity geometry
        np.testing.assert_allclose(restored[i] * 255, ex["image"], atol=0.02)
        np.testing.assert_array_equal(masks[i], ex["mask"][..., 0])
        assert labels[i] == ex["label"]


def test_eval_mask_follows_resize_and_center_crop():
    mask = np.zeros((48, 64, 1), np.uint8)
    mask[10:40, 5:30] = 1
    image = np.repeat(mask * 255, 3, axis=-1)
    out, m = pp.eval_preprocess(tf.constant(image), image_size=24, crop_pct=0.875,
                                mask=tf.constant(mask), mean=(0, 0, 0), std=(1, 1, 1))
    assert out.shape == (24, 24, 3) and m.shape == (24, 24) and m.dtype == tf.uint8
    agree = np.mean((out.numpy()[..., 0] > 0.5) == (m.numpy() > 0))
    assert agree > 0.97 and 0.05 < m.numpy().mean() < 0.6


def test_two_hosts_disjoint_equal_batches(data_dir):
    split, total = "test[:101]", 101
    _, single = _eval(data_dir, split=split, batch=16)
    everything = set(_hashes(single))
    assert len(everything) == total
    per_host, counts = [], []
    for index in (0, 1):
        _, batches = _eval(data_dir, split=split, batch=16, process_index=index, process_count=2)
        per_host.append(set(_hashes(batches)))
        counts.append(len(batches))
    assert per_host[0].isdisjoint(per_host[1])
    assert per_host[0] | per_host[1] == everything
    assert counts[0] == counts[1] == P.num_eval_batches(NAME, split, 16, data_dir=data_dir,
                                                        process_count=2)
    # Shards of 51 and 50 with batch 1: host 1 must add one whole invalid batch.
    sizes = []
    for index in (0, 1):
        _, batches = _eval(data_dir, split=split, batch=1, process_index=index, process_count=2)
        assert len(batches) == 51
        sizes.append(sum(int(b["valid"].sum()) for b in batches))
    assert sizes == [51, 50]


def test_imagefolder(tmp_path):
    rng = np.random.default_rng(0)
    counts = {"train": 5, "test": 3}
    for split, n in counts.items():
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                h, w = rng.integers(20, 50, 2)
                arr = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
                Image.fromarray(arr).save(tmp_path / split / cls / f"{i}.jpg", quality=90)
    name = f"imagefolder:{tmp_path}"
    info = P.dataset_info(name)
    assert info["num_classes"] == 2 and info["splits"] == {"train": 10, "test": 6}
    ds = P.make_dataset(name, "test", train=False, image_size=16, per_host_batch_size=4)
    batches = list(ds.as_numpy_iterator())
    assert len(batches) == 2 and sum(b["valid"].sum() for b in batches) == 6
    assert batches[0]["image"].shape == (4, 16, 16, 3)
    labels = np.concatenate([b["label"][b["valid"]] for b in batches])
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]
    hosts = [sum(int(b["valid"].sum()) for b in P.make_dataset(
        name, "train", train=False, image_size=16, per_host_batch_size=4, process_index=i,
        process_count=2).as_numpy_iterator()) for i in (0, 1)]
    assert hosts == [5, 5]
    train = P.make_dataset(name, "train", train=True, image_size=16, per_host_batch_size=4,
                           randaugment="rand-m9-mstd0.5")
    b = next(train.as_numpy_iterator())
    assert b["image"].shape == (4, 16, 16, 3) and b["valid"].all()


def test_errors_name_the_problem(tmp_path, data_dir):
    kw = dict(train=False, image_size=32, per_host_batch_size=4)
    with pytest.raises(ValueError, match=r"saitjax_shapez.*saitjax_shapes.*list_builders"):
        P.make_dataset("saitjax_shapez", "test", **kw)
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="data_dir.*nope"):
        P.make_dataset("cifar10", "test", data_dir=missing, **kw)
    with pytest.raises(FileNotFoundError, match="ImageFolder root.*nope.*<split>/<class>"):
        P.make_dataset(f"imagefolder:{missing}", "test", **kw)
    with pytest.raises(FileNotFoundError, match="manual_dir.*nope.*does not exist"):
        P.make_dataset("imagenet2012", "validation", data_dir=str(tmp_path), manual_dir=missing,
                       **kw)
    with pytest.raises(FileNotFoundError, match="lacks ILSVRC2012_img_train.tar"):
        P.make_dataset("imagenet2012", "validation", data_dir=str(tmp_path),
                       manual_dir=str(tmp_path), **kw)
    with pytest.raises(FileNotFoundError, match="not prepared.*tfds build cifar10"):
        P.make_dataset("cifar10", "test", data_dir=str(tmp_path), **kw)
    with pytest.raises(ValueError, match="huge.*default.*tiny"):
        P.make_dataset("saitjax_shapes/huge", "test", data_dir=data_dir, **kw)
    with pytest.raises(ValueError, match="split 'validation'.*train.*test"):
        P.make_dataset(NAME, "validation", data_dir=data_dir, **kw)
    with pytest.raises(ValueError, match="no 'mask'"):
        P.make_dataset(f"imagefolder:{data_dir}", "x", keep_mask=True, **kw)


def test_to_global_batch_and_iterator(data_dir):
    devices = jax.devices()
    assert len(devices) == 8
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    ds = P.make_dataset(NAME, "test", train=False, image_size=32, per_host_batch_size=16,
                        data_dir=data_dir, keep_mask=True, crop_pct=1.0)
    local = next(ds.as_numpy_iterator())
    batch = P.to_global_batch(local, mesh)
    for key, value in batch.items():
        assert isinstance(value, jax.Array)
        assert value.shape == local[key].shape and value.dtype == local[key].dtype
        assert value.sharding.spec[0] == "data"
        shards = value.addressable_shards
        assert len(shards) == 8 and all(s.data.shape[0] == 2 for s in shards)
        np.testing.assert_array_equal(np.asarray(value), local[key])
    sharding = P.data_sharding(mesh)
    out = list(P.global_batches(ds, sharding))
    assert len(out) == 8 and all(b["image"].sharding == sharding for b in out)
    assert sum(int(b["valid"].sum()) for b in out) == 128


def test_prefetch_to_device_keeps_order():
    assert list(P.prefetch_to_device(iter(range(7)), 2)) == list(range(7))
    assert list(P.prefetch_to_device(iter([]), 2)) == []


# ----------------------------------------------------------------------------- preprocessing

def test_random_crop_window_bounds_and_fallback():
    for i in range(50):
        y, x, h, w = pp.random_crop_window(tf.constant([i, 1], tf.int64), tf.constant([40, 60, 3]),
                                           (0.08, 1.0)).numpy()
        assert 0 <= y and 0 <= x and y + h <= 40 and x + w <= 60 and h > 0 and w > 0
        assert 0.08 * 2400 * 0.9 <= h * w <= 2400
    # A 10x100 strip cannot hold a crop of area >= 0.9 with ratio <= 4/3: centre fallback.
    y, x, h, w = pp.random_crop_window(tf.constant([0, 0], tf.int64), tf.constant([10, 100, 3]),
                                       (0.9, 1.0)).numpy()
    assert (h, w) == (10, round(10 * 4 / 3)) and y == 0 and x == (100 - w) // 2


def test_eval_geometry():
    img = tf.constant(np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.uint8))
    same = pp.resize_and_center_crop(img, 32, crop_pct=1.0)
    np.testing.assert_array_equal(same.numpy(), img.numpy().astype(np.float32))
    out = pp.resize_and_center_crop(tf.zeros((48, 64, 3), tf.uint8), 28, crop_pct=0.875)
    assert out.shape == (28, 28, 3)
    with pytest.raises(ValueError, match="crop_pct"):
        pp.resize_and_center_crop(img, 32, crop_pct=1.5)


# ----------------------------------------------------------------------------- RandAugment

def _image(seed=0, lo=40, hi=200, size=20):
    return np.random.default_rng(seed).integers(lo, hi, (size, size, 3)).astype(np.uint8)


# timm's ops that leave the image unchanged at magnitude 0 (the rest have no magnitude, or map 0 to
# a change: Posterize 0 bits, PosterizeIncreasing 4 bits, Solarize at 0, enhancement factor 0.1)
IDENTITY_AT_ZERO = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel", "SolarizeAdd",
                    "SolarizeIncreasing", "ColorIncreasing", "ContrastIncreasing",
                    "BrightnessIncreasing", "SharpnessIncreasing"}


@pytest.mark.parametrize("name", sorted(ra.OPS))
def test_op_keeps_shape_dtype_and_magnitude_zero(name):
    img = _image()
    for m in (0.0, 5.0, 10.0):
        for negate in (False, True):
            out = ra.apply_op(name, img, m, negate)
            assert out.shape == img.shape and out.dtype == tf.uint8
    if name in IDENTITY_AT_ZERO:
        np.testing.assert_array_equal(ra.apply_op(name, img, 0.0).numpy(), img)


def test_ops_against_pil():
    """PIL-only spot checks (tests/test_randaugment_timm.py compares every op with timm's)."""
    img = _image()
    pil = Image.fromarray(img)
    same = np.testing.assert_array_equal
    same(ra.apply_op("AutoContrast", img, 5).numpy(), ImageOps.autocontrast(pil))
    same(ra.apply_op("Equalize", img, 5).numpy(), ImageOps.equalize(pil))
    same(ra.apply_op("Invert", img, 5).numpy(), ImageOps.invert(pil))
    for name, enhancer in [("ColorIncreasing", ImageEnhance.Color),
                           ("ContrastIncreasing", ImageEnhance.Contrast),
                           ("BrightnessIncreasing", ImageEnhance.Brightness),
                           ("SharpnessIncreasing", ImageEnhance.Sharpness)]:
        for negate, factor in ((True, 1 - 0.45), (False, 1 + 0.45)):   # 1 -+ 0.9 * 5 / 10
            same(ra.apply_op(name, img, 5, negate).numpy(), enhancer(pil).enhance(factor))
    same(ra.apply_op("Solarize", img, 10).numpy(), ImageOps.solarize(pil, 256))
    same(ra.apply_op("SolarizeIncreasing", img, 10).numpy(), ImageOps.solarize(pil, 0))
    same(ra.apply_op("PosterizeIncreasing", img, 5).numpy(), ImageOps.posterize(pil, 2))
    for negate, degrees in ((False, 15.0), (True, -15.0)):
        same(ra.apply_op("Rotate", img, 5, negate).numpy(),
             pil.rotate(degrees, resample=Image.BICUBIC, fillcolor=ra.FILL_COLOUR))


def test_translate_shifts_and_fills():
    img = _image(size=20)
    shift = 9   # 0.45 * 20, a whole number of pixels: the bicubic kernel copies them
    for negate in (False, True):
        out = ra.apply_op("TranslateXRel", img, 10, negate).numpy()
        if negate:    # content moves right
            np.testing.assert_array_equal(out[:, shift:], img[:, :20 - shift])
            filled = out[:, :shift]
        else:
            np.testing.assert_array_equal(out[:, :20 - shift], img[:, shift:])
            filled = out[:, 20 - shift:]
        np.testing.assert_array_equal(filled, np.broadcast_to(ra.FILL_COLOUR, filled.shape))


def test_rand_augment_policy():
    img = tf.constant(_image(size=24))
    seed = tf.constant([5, 6], tf.int64)
    a = ra.rand_augment(img, seed).numpy()
    np.testing.assert_array_equal(a, ra.rand_augment(img, seed).numpy())
    assert a.shape == (24, 24, 3) and a.dtype == np.uint8
    changed = sum(not np.array_equal(ra.rand_augment(img, tf.constant([i, 0], tf.int64)).numpy(),
                                     img.numpy()) for i in range(12))
    assert changed >= 6
    np.testing.assert_array_equal(ra.rand_augment(img, seed, prob=0.0).numpy(), img.numpy())
    np.testing.assert_array_equal(ra.rand_augment(img, seed, num_layers=0).numpy(), img.numpy())
    fn = tf.function(lambda x, s: ra.rand_augment(x, s, magnitude=9, magnitude_std=0.5))
    assert fn(img, seed).shape == (24, 24, 3)


def test_parse_randaugment():
    assert ra.parse_randaugment("rand-m9-mstd0.5-inc1") == {
        "num_layers": 2, "magnitude": 9, "magnitude_std": 0.5, "prob": 0.5, "increasing": True}
    assert ra.parse_randaugment("rand-m9-mstd0.5")["increasing"] is False     # timm's default
    assert ra.parse_randaugment("rand-n3-m7-p1.0")["num_layers"] == 3
    assert ra.parse_randaugment("rand-mstd101")["magnitude_std"] == float("inf")   # uniform
    for bad in ("auto-m9", "rand-q3", "rand-m9-mmax12", "rand-tweights", "rand-m9.5"):
        with pytest.raises(ValueError):
            ra.parse_randaugment(bad)
