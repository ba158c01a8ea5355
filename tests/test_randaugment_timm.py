"""saitjax's TF RandAugment against timm's PIL one (``timm.data.auto_augment``), on fixed images.

Every op is compared with timm's op function at timm's argument for the same magnitude and sign,
with both resampling filters, eagerly and inside ``tf.data``: pixel for pixel, no tolerance
(none is needed: the ops reproduce PIL's arithmetic). The op lists, the magnitude -> argument
tables, the spec parsing and the sampling statistics are compared with timm's too.
"""

import math
import random

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
pytest.importorskip("torch")

from PIL import Image  # noqa: E402

from saitjax.data import randaugment as ra  # noqa: E402

pytestmark = pytest.mark.torch

RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}
HPARAMS = dict(translate_const=100, img_mean=ra.FILL_COLOUR)   # as timm's create_transform
GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


@pytest.fixture(scope="module")
def aa():
    from timm_reference import import_timm

    import_timm()            # skips where timm cannot be imported
    from timm.data import auto_augment

    return auto_augment


def _shapes(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Gradients, a disc and a rectangle plus a little noise: edges, smooth areas, all channels."""
    y, x = np.mgrid[0:h, 0:w]
    img = np.zeros((h, w, 3), np.int32)
    img[..., 0] = 20 + (x * 200) // (w - 1)
    img[..., 1] = 30 + (y * 180) // (h - 1)
    img[..., 2] = np.where((x - w / 3) ** 2 + (y - h / 2) ** 2 < (h / 4) ** 2, 230, 60)
    img[h // 5: h // 2, w // 2: w - 3] = (250, 15, 120)
    noise = np.random.default_rng(seed).integers(-12, 13, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def _timm_arg(aa, name: str, magnitude: float, negate: bool) -> tuple:
    """timm's level -> argument with the random sign fixed."""
    level_fn = aa.LEVEL_TO_ARG[name]
    if level_fn is None:
        return ()
    saved = aa._randomly_negate
    aa._randomly_negate = (lambda v: -v) if negate else (lambda v: v)
    try:
        return level_fn(magnitude, HPARAMS)
    finally:
        aa._randomly_negate = saved


def _timm_op(aa, name: str, img: np.ndarray, magnitude: float, negate: bool,
             interpolation: str = "bicubic") -> np.ndarray | None:
    """timm's op on ``img``; None where Pillow refuses the argument (posterize to 0 bits)."""
    args = _timm_arg(aa, name, magnitude, negate)
    try:
        out = aa.NAME_TO_OP[name](Image.fromarray(img), *args, fillcolor=ra.FILL_COLOUR,
                                  resample=RESAMPLE[interpolation])
    except ValueError:
        assert "Posterize" in name and args == (0,)
        return None
    return np.asarray(out)


def _cases(name: str):
    """(image, magnitude, negate, interpolation) for one op: fixed and random images."""
    rng = np.random.default_rng(sum(map(ord, name)))
    interps = ("bicubic", "bilinear") if name in GEOMETRIC else ("bicubic",)
    out = []
    for img in (_shapes(32, 32), _shapes(40, 28, seed=1)):
        for m in (0, 2.2, 5, 7.5, 9, 9.7, 10):
            for negate in (False, True):
                out += [(img, m, negate, i) for i in interps]
    for _ in range(12):                         # random sizes, ranges and magnitudes
        h, w = rng.integers(3, 50, 2)
        lo, hi = sorted(rng.integers(0, 256, 2))
        img = rng.integers(lo, hi + 1, (h, w, 3)).astype(np.uint8)
        out.append((img, float(rng.uniform(0, 10)), bool(rng.integers(2)),
                    interps[rng.integers(len(interps))]))
    return out


# ----------------------------------------------------------------------------- tables

def test_op_lists_and_constants_match_timm(aa):
    from timm.data.constants import IMAGENET_DEFAULT_MEAN

    assert ra.TRANSFORMS == tuple(aa._RAND_TRANSFORMS)
    assert ra.INCREASING_TRANSFORMS == tuple(aa._RAND_INCREASING_TRANSFORMS)
    assert set(ra.TRANSFORMS) | set(ra.INCREASING_TRANSFORMS) == set(ra.OPS)
    for name, op in ra.OPS.items():
        assert op.has_arg == (aa.LEVEL_TO_ARG[name] is not None), name
    assert ra.LEVEL_DENOM == aa._LEVEL_DENOM
    # create_transform's img_mean for RandAugment, from the ImageNet mean
    assert ra.FILL_COLOUR == tuple(min(255, round(255 * x)) for x in IMAGENET_DEFAULT_MEAN)
    assert _timm_arg(aa, "TranslateXRel", 10, False) == (ra.TRANSLATE_PCT,)


@pytest.mark.parametrize("name", [n for n in sorted(ra.OPS) if ra.OPS[n].has_arg])
def test_level_to_arg_matches_timm(aa, name):
    mags = np.concatenate([np.linspace(0, 10, 201), np.random.default_rng(0).uniform(0, 10, 200)])
    for negate in (False, True):
        got = ra.op_argument(name, tf.constant(mags, tf.float64), negate).numpy()
        want = np.array([_timm_arg(aa, name, float(m), negate)[0] for m in mags], np.float64)
        np.testing.assert_array_equal(got, want, err_msg=f"{name} negate={negate}")


# ----------------------------------------------------------------------------- ops

@pytest.mark.parametrize("name", sorted(ra.OPS))
def test_op_matches_timm_pixel_for_pixel(aa, name):
    compared = 0
    for img, m, negate, interp in _cases(name):
        want = _timm_op(aa, name, img, m, negate, interp)
        got = ra.apply_op(name, img, m, negate, interp).numpy()
        if want is None:     # this Pillow refuses 0 bits; older Pillow gave black
            np.testing.assert_array_equal(got, np.zeros_like(img))
            continue
        diff = np.abs(got.astype(int) - want)
        assert diff.max() == 0, (name, img.shape, m, negate, interp, int((diff > 0).sum()))
        compared += 1
    assert compared >= 20


@pytest.mark.parametrize("name", ["Rotate", "ShearX", "TranslateYRel", "Equalize", "AutoContrast",
                                  "ContrastIncreasing", "SharpnessIncreasing", "Color"])
def test_op_matches_timm_inside_tf_data(aa, name):
    """The pipeline runs the ops as a graph (grappler-rewritten): still PIL's pixels."""
    for interp in ("bicubic", "bilinear") if name in GEOMETRIC else ("bicubic",):
        cases = [c for c in _cases(name) if c[3] == interp][::3]
        ds = tf.data.Dataset.from_generator(
            lambda cases=cases: ((c[0], c[1], c[2]) for c in cases),
            output_signature=(tf.TensorSpec([None, None, 3], tf.uint8),
                              tf.TensorSpec([], tf.float64), tf.TensorSpec([], tf.bool)))
        ds = ds.map(lambda x, m, s, interp=interp: ra.apply_op(name, x, m, s, interp))
        for (img, m, negate, _), got in zip(cases, ds.as_numpy_iterator(), strict=True):
            want = _timm_op(aa, name, img, float(m), bool(negate), interp)
            if want is not None:
                np.testing.assert_array_equal(got, want, err_msg=f"{name} {m} {negate} {interp}")


def test_histogram_ops_edge_cases_match_timm(aa):
    """Constant channels, two levels, one grey, and equalize's table running past 255."""
    rng = np.random.default_rng(3)
    few = (rng.integers(0, 4, (32, 32, 3)) * 64).astype(np.uint8)
    images = [np.full((8, 8, 3), 77, np.uint8), few, few[..., ::-1].copy(),
              np.where(rng.random((16, 16, 1)) < 0.9, 10, 200).repeat(3, -1).astype(np.uint8)]
    images[1][..., 2] = 99
    for img in images:
        for name in ("Equalize", "AutoContrast", "Invert"):
            np.testing.assert_array_equal(ra.apply_op(name, img, 0).numpy(),
                                          _timm_op(aa, name, img, 0, False), err_msg=name)


# ----------------------------------------------------------------------------- policy

SPECS = ["rand-m9-mstd0.5-inc1", "rand-m9-mstd0.5", "rand-m7-n3-p0.8", "rand-n1-m10-mstd101-inc1",
         "rand-inc0-m3", "rand", "rand-m12-mstd1-p1.0-n2"]


@pytest.mark.parametrize("spec", SPECS)
def test_spec_parses_like_timm(aa, spec):
    kw = ra.parse_randaugment(spec)
    t = aa.rand_augment_transform(spec, dict(HPARAMS))
    assert kw["num_layers"] == t.num_layers and t.choice_weights is None   # uniform, replacement
    assert [op.name for op in t.ops] == list(ra.transforms(kw["increasing"]))
    for op in t.ops:
        assert (op.prob, op.magnitude, op.magnitude_std, op.magnitude_max) == (
            kw["prob"], kw["magnitude"], kw["magnitude_std"], None)


@pytest.mark.parametrize("spec", ["rand-m9-mmax12", "rand-tweights", "rand-m9-t3a", "rand-m9.5",
                                  "rand-m9-m8", "rand-q3", "rand-m9-inc", "auto-m9", "rand--m9"])
def test_unsupported_specs_are_refused(spec):
    with pytest.raises(ValueError, match="RandAugment"):
        ra.parse_randaugment(spec)


def _timm_draws(aa, spec: str, images: int) -> dict:
    """What timm's RandAugment chooses over ``images`` calls: ops, applied, magnitudes, signs."""
    t = aa.rand_augment_transform(spec, dict(HPARAMS))
    log = {"chosen": [], "applied": 0, "magnitude": [], "negated": []}

    class Spy:
        def __init__(self, op):
            self.op = op
            level_fn = op.level_fn or (lambda m, hp: ())

            def level(m, hp, level_fn=level_fn, name=op.name):
                log["magnitude"].append(m)
                args = level_fn(m, hp)
                if name in GEOMETRIC and m > 0:
                    log["negated"].append(args[0] < 0)
                return args

            def applied(img, *args, **kwargs):
                log["applied"] += 1
                return img

            op.level_fn, op.aug_fn = level, applied

        def __call__(self, img):
            log["chosen"].append(self.op.name)
            return self.op(img)

    t.ops = [Spy(op) for op in t.ops]
    img = Image.new("RGB", (4, 4))
    py_state, np_state = random.getstate(), np.random.get_state()
    random.seed(0)
    np.random.seed(0)
    try:
        for _ in range(images):
            t(img)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return log


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    grid = np.sort(np.concatenate([a, b]))
    cdf = lambda s: np.searchsorted(np.sort(s), grid, side="right") / len(s)  # noqa: E731
    return float(np.abs(cdf(a) - cdf(b)).max())


@pytest.mark.parametrize("spec", ["rand-m9-mstd0.5-inc1", "rand-n3-m7-mstd101-p0.8"])
def test_sampling_statistics_match_timm(aa, spec):
    n_images = 3000
    kw = ra.parse_randaugment(spec)
    ops = ra.transforms(kw["increasing"])
    seeds = tf.stack([tf.range(n_images, dtype=tf.int64),
                      tf.fill([n_images], tf.constant(7, tf.int64))], axis=1)
    fn = tf.function(lambda s: ra.draw(s, kw["num_layers"], len(ops), kw["magnitude"],
                                       kw["magnitude_std"], kw["prob"]))
    sig = ra.Draws(*(tf.TensorSpec([kw["num_layers"]], dt) for dt in
                     (tf.int32, tf.bool, tf.float64, tf.bool, tf.bool)))
    ours = tf.map_fn(fn, seeds, fn_output_signature=sig)
    timm = _timm_draws(aa, spec, n_images)
    layers = n_images * kw["num_layers"]
    assert len(timm["chosen"]) == layers == int(tf.size(ours.op))

    tol = lambda p, n: 5 * math.sqrt(p * (1 - p) / n)  # noqa: E731 - 5 standard errors
    p_op = 1 / len(ops)
    ours_freq = np.bincount(ours.op.numpy().ravel(), minlength=len(ops)) / layers
    timm_freq = np.array([timm["chosen"].count(n) for n in ops]) / layers
    assert np.abs(ours_freq - p_op).max() < tol(p_op, layers)
    assert np.abs(timm_freq - p_op).max() < tol(p_op, layers)
    prob = kw["prob"]
    assert abs(ours.apply.numpy().mean() - prob) < tol(prob, layers) + 1e-9
    assert abs(timm["applied"] / layers - prob) < tol(prob, layers) + 1e-9
    assert abs(ours.negate.numpy().mean() - 0.5) < tol(0.5, layers)
    assert abs(np.mean(timm["negated"]) - 0.5) < tol(0.5, len(timm["negated"]))
    # magnitudes (drawn per applied op in timm; the same law for every layer here)
    mags_ours = ours.magnitude.numpy()[ours.apply.numpy()]
    mags_timm = np.array(timm["magnitude"])
    assert mags_ours.min() >= 0 and mags_ours.max() <= 10
    n, k = len(mags_ours), len(mags_timm)
    assert _ks(mags_ours, mags_timm) < 1.95 * math.sqrt((n + k) / (n * k))   # 0.1 % level
    assert abs(np.mean(mags_ours == 10.0) - np.mean(mags_timm == 10.0)) < 0.02


def test_rand_augment_applies_what_it_draws(aa):
    """The full policy = timm's op functions applied in turn with the drawn ops/magnitudes/signs."""
    img = _shapes(24, 24)
    for spec in ("rand-m9-mstd0.5-inc1", "rand-m9-mstd0.5"):
        kw = ra.parse_randaugment(spec)
        ops = ra.transforms(kw["increasing"])
        for i in range(16):
            seed = tf.constant([i, 11], tf.int64)
            d = ra.draw(seed, kw["num_layers"], len(ops), kw["magnitude"], kw["magnitude_std"],
                        kw["prob"])
            want = img
            for layer in range(kw["num_layers"]):
                if d.apply[layer]:
                    name = ops[int(d.op[layer])]
                    want = _timm_op(aa, name, want, float(d.magnitude[layer]),
                                    bool(d.negate[layer]))
                    if want is None:
                        want = np.zeros_like(img)
            got = ra.rand_augment(tf.constant(img), seed, **kw).numpy()
            np.testing.assert_array_equal(got, want, err_msg=f"{spec} seed {i}")
