"""RandAugment as TensorFlow ops on uint8 images, reproducing timm's ``rand_augment_transform``.

Why: the DeiT and Swin recipes train with timm's ``rand-m9-mstd0.5-inc1``, applied to PIL
images. A reproduction should augment the same way inside its tf.data pipeline, so each op here
re-implements the PIL operation timm calls, with PIL's integer and float arithmetic.

Matched (timm 1.0.31 ``timm/data/auto_augment.py`` with Pillow 13; tests/test_randaugment_timm.py
compares against timm's own functions on fixed and random images):

* Spec strings, parsed like timm: ``rand`` then ``m<int>`` magnitude (default 10), ``n<int>``
  ops per image (2), ``mstd<float>`` magnitude std (0; above 100: uniform in [0, m]),
  ``p<float>`` probability of applying each op (0.5), ``inc<0|1>`` (0). ``inc1`` selects timm's
  ``_RAND_INCREASING_TRANSFORMS``; without it timm's ``_RAND_TRANSFORMS`` (so plain
  ``rand-m9-mstd0.5`` has Posterize / Solarize / enhancements whose strength does not grow with
  m). What timm would accept but this module does not reproduce (``mmax``, ``t<set>`` weighted
  and 3-Augment sets) and sections timm would ignore or misread (no number, repeated keys) raise
  a ValueError.
* Ops: the 15 of each set, in timm's order, including Invert, SolarizeAdd, PosterizeIncreasing
  and SolarizeIncreasing. Each is pixel-identical to timm's op at the same argument: 0 differing
  pixels over every op x 2 images x 7 magnitudes x both signs (x bilinear and bicubic for the
  geometric ops) plus random images of 3-49 px, eagerly and inside ``tf.data.map``. That covers
  AutoContrast (PIL's float64 lookup table, truncated), Equalize (PIL's step table), Posterize,
  Solarize, SolarizeAdd, Invert, Color / Contrast / Brightness / Sharpness (PIL's integer luma,
  mean and SMOOTH-filtered degenerate images, then ``Image.blend``'s float32 arithmetic,
  truncated) and Rotate / ShearX / ShearY / TranslateXRel / TranslateYRel (PIL's affine
  transform: output pixel centres mapped through the inverse matrix in float64, PIL's rotate
  matrix about (w/2, h/2) rounded to 15 digits, PIL's bicubic kernel (a = -1) or bilinear kernel
  with edge-clamped neighbours, truncated, and a hard-edged fill).
* Magnitude -> argument: timm's ``LEVEL_TO_ARG`` in float64 with its truncations, equal as
  floats to timm's values at 401 magnitudes (e.g. PosterizeIncreasing keeps
  ``4 - int(m/10*4)`` bits, SolarizeAdd adds ``min(128, int(m/10*110))`` below 128, Rotate is
  +-30*m/10 degrees, TranslateXRel +-0.45*m/10 of the width, Increasing enhancements
  ``max(0.1, 1 +- 0.9*m/10)``).
* Hyper-parameters as DeiT's ``create_transform`` passes them: fill colour
  ``round(255 * ImageNet mean)`` = (124, 116, 104), translate_pct 0.45 (default), resampling
  from ``--train-interpolation bicubic``, hence ``interpolation="bicubic"`` here by default
  (``"random"`` picks bilinear or bicubic per op, timm's default when no interpolation is set).
* Sampling: ``n`` ops drawn uniformly with replacement, each applied with probability ``p``,
  its magnitude drawn per application from N(m, mstd) (or U(0, m)) and clipped to [0, 10]
  (``_LEVEL_DENOM``), a fair sign for the signed ops. The test compares op frequencies, apply
  rate, sign rate and the magnitude distribution (Kolmogorov-Smirnov) with timm's own draws.

Not matched: the random streams themselves (TF stateless numbers here, Python's ``random`` in
timm: same distributions, different draws). Posterize to 0 bits (PosterizeIncreasing at m = 10,
Posterize below m = 2.5) gives a black image, as older Pillow did for timm (mask ~255);
Pillow 13 refuses the argument, so timm's op raises there. Float64 round-off: the arithmetic
follows PIL's order, but TF's ``sin`` / ``cos`` and the 15-digit rounding of the rotate matrix
are not guaranteed bit-equal to libm / Python's ``round``; a difference would move a sample by
~1e-13, changing a pixel by one grey level only where a value lies that close to an integer
(never seen in the tests). The fill colour is the data config's ``mean`` in 0..255, as timm's
``img_mean`` (the training pipeline passes it); the interpolation is the spec's, bicubic by default.
"""

from __future__ import annotations

import math
import re
from typing import Callable, NamedTuple, Sequence

import tensorflow as tf

from saitjax.data.preprocess import IMAGENET_MEAN, hide_gpus_from_tf

hide_gpus_from_tf()

LEVEL_DENOM = 10.0          # timm's _LEVEL_DENOM: magnitudes are clipped to [0, 10]
MAX_MAGNITUDE = LEVEL_DENOM
TRANSLATE_PCT = 0.45        # timm's default translate_pct (TranslateXRel / TranslateYRel)
FILL_COLOUR = tuple(min(255, round(255 * m)) for m in IMAGENET_MEAN)   # (124, 116, 104)
INTERPOLATIONS = ("bicubic", "bilinear", "random")

# timm's _RAND_TRANSFORMS and _RAND_INCREASING_TRANSFORMS, in timm's order.
TRANSFORMS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
    "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel",
    "TranslateYRel")
INCREASING_TRANSFORMS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")

F64 = tf.float64


# ----------------------------------------------------------------------------- helpers

def _f64(v: float | tf.Tensor) -> tf.Tensor:
    """float64 tensor; a Python number is converted directly (``tf.cast`` would pass float32)."""
    return tf.cast(tf.convert_to_tensor(v, dtype_hint=F64), F64)


def _lut(image: tf.Tensor, table: tf.Tensor) -> tf.Tensor:
    """PIL ``Image.point``: lookup in ``table`` int [256] or per channel [3, 256], clipped."""
    table = tf.clip_by_value(tf.cast(table, tf.int32), 0, 255)
    if table.shape.rank == 1:
        return tf.cast(tf.gather(table, tf.cast(image, tf.int32)), tf.uint8)
    idx = tf.cast(image, tf.int32) + tf.constant([0, 256, 512], tf.int32)
    return tf.cast(tf.gather(tf.reshape(table, [-1]), idx), tf.uint8)


def _luma(image: tf.Tensor) -> tf.Tensor:
    """PIL ``convert("L")``: (19595 R + 38470 G + 7471 B + 2^15) >> 16, int32 [H, W]."""
    x = tf.cast(image, tf.int32)
    return (x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 32768) // 65536


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """PIL ``Image.blend(degenerate, image, factor)``: float32 arithmetic, clipped, truncated."""
    alpha = tf.cast(_f64(factor), tf.float32)
    deg = tf.cast(degenerate, tf.int32)
    out = tf.cast(deg, tf.float32) + alpha * tf.cast(tf.cast(image, tf.int32) - deg, tf.float32)
    return tf.cast(tf.floor(tf.clip_by_value(out, 0.0, 255.0)), tf.uint8)


def _cubic(v1: tf.Tensor, v2: tf.Tensor, v3: tf.Tensor, v4: tf.Tensor, d: tf.Tensor) -> tf.Tensor:
    """PIL's BICUBIC macro (a = -1), operation for operation, in float64."""
    p2 = v3 - v1
    p3 = 2.0 * (v1 - v2) + v3 - v4
    p4 = v2 - v1 - v3 + v4
    return v2 + d * (p2 + d * (p3 + d * p4))


def _linear(v1: tf.Tensor, v2: tf.Tensor, d: tf.Tensor) -> tf.Tensor:
    """PIL's BILINEAR macro, in float64."""
    return v1 + (v2 - v1) * d


def _affine(image: tf.Tensor, matrix: Sequence[tf.Tensor | float], fill: tf.Tensor,
            bicubic: bool | tf.Tensor, along: str | None = None) -> tf.Tensor:
    """PIL ``Image.transform(size, AFFINE, matrix, resample, fillcolor=fill)`` on uint8 RGB.

    Output pixel (x, y) samples the input at ``(a0 X + a1 Y + a2, a3 X + a4 Y + a5)`` with
    X = x + 0.5, Y = y + 0.5; a point outside [0, w) x [0, h) takes ``fill``; inside, PIL's
    bicubic (4 x 4) or bilinear (2 x 2) kernel with neighbours clamped to the image, then
    clipped to 0..255 and truncated. ``along="x"`` ("y") promises the matrix keeps rows
    (columns): there the kernel's weight is exactly 1 on the centre tap, so that pass is skipped
    (same values, 4x less work).
    """
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    a0, a1, a2, a3, a4, a5 = [_f64(a) for a in matrix]
    ys, xs = tf.meshgrid(tf.cast(tf.range(h), F64) + 0.5, tf.cast(tf.range(w), F64) + 0.5,
                         indexing="ij")
    xin = a0 * xs + a1 * ys + a2
    yin = a3 * xs + a4 * ys + a5
    inside = ((xin >= 0.0) & (xin < tf.cast(w, F64)) & (yin >= 0.0) & (yin < tf.cast(h, F64)))
    xin, yin = xin - 0.5, yin - 0.5
    # Out-of-image points are masked below; keep their indices finite and small.
    xin = tf.where(inside, xin, 0.0)
    yin = tf.where(inside, yin, 0.0)
    x0, y0 = tf.floor(xin), tf.floor(yin)
    dx, dy = (xin - x0)[..., None], (yin - y0)[..., None]
    x0, y0 = tf.cast(x0, tf.int32), tf.cast(y0, tf.int32)
    flat = tf.reshape(image, [-1, 3])

    def sample(cubic: bool) -> tf.Tensor:
        taps = [-1, 0, 1, 2] if cubic else [0, 1]
        row_taps = [0] if along == "x" else taps
        col_taps = [0] if along == "y" else taps
        rows = tf.clip_by_value(y0[None] + tf.constant(row_taps)[:, None, None], 0, h - 1)
        cols = tf.clip_by_value(x0[None] + tf.constant(col_taps)[:, None, None], 0, w - 1)
        # [columns, rows, H, W, 3]: leading axes, so unstacking them is cheap.
        window = tf.cast(tf.gather(flat, cols[:, None] + rows[None] * w), F64)
        kernel = _cubic if cubic else _linear
        line = kernel(*tf.unstack(window), dx) if len(col_taps) > 1 else window[0]
        return kernel(*tf.unstack(line), dy) if len(row_taps) > 1 else line[0]

    if isinstance(bicubic, bool):
        value = sample(bicubic)
    else:
        value = tf.cond(bicubic, lambda: sample(True), lambda: sample(False))
    value = tf.cast(tf.floor(tf.clip_by_value(value, 0.0, 255.0)), tf.uint8)
    fill = tf.broadcast_to(tf.cast(fill, tf.uint8), tf.shape(value))
    return tf.where(inside[..., None], value, fill)


def _round15(v: tf.Tensor) -> tf.Tensor:
    """Python's ``round(v, 15)`` (as PIL rounds its rotate matrix), up to float64 round-off."""
    return tf.round(v * 1e15) / 1e15


# ----------------------------------------------------------------------------- ops
# Every op: (uint8 image [H, W, 3], argument float64 scalar, fill uint8 [3], bicubic bool)
# -> uint8 image [H, W, 3]; the argument is what timm's op function receives.

def auto_contrast(image: tf.Tensor, arg: tf.Tensor, fill: tf.Tensor,
                  bicubic: tf.Tensor) -> tf.Tensor:
    """ImageOps.autocontrast: per channel, int(i * scale + offset) over its [lowest, highest]."""
    x = tf.cast(image, tf.int32)
    lo = tf.reduce_min(x, axis=[0, 1])
    hi = tf.reduce_max(x, axis=[0, 1])
    scale = 255.0 / tf.cast(tf.maximum(hi - lo, 1), F64)
    offset = -(tf.cast(lo, F64) * scale)
    ramp = tf.cast(tf.range(256), F64)[None, :]
    stretched = tf.clip_by_value(ramp * scale[:, None] + offset[:, None], 0.0, 255.0)
    stretched = tf.cast(stretched, tf.int32)   # truncation, like int() (values are >= 0)
    table = tf.where((hi > lo)[:, None], stretched, tf.range(256)[None, :])
    return _lut(image, table)


def equalize(image: tf.Tensor, arg: tf.Tensor, fill: tf.Tensor, bicubic: tf.Tensor) -> tf.Tensor:
    """ImageOps.equalize: per channel, (step // 2 + pixels below i) // step (PIL's step)."""
    tables = []
    for c in range(3):
        hist = tf.math.bincount(tf.reshape(tf.cast(image[..., c], tf.int32), [-1]),
                                minlength=256, maxlength=256)
        last = tf.reduce_max(tf.where(hist > 0, tf.range(256), -1))
        step = (tf.reduce_sum(hist) - tf.gather(hist, last)) // 255
        table = (step // 2 + tf.cumsum(hist, exclusive=True)) // tf.maximum(step, 1)
        tables.append(tf.where(step > 0, table, tf.range(256)))
    return _lut(image, tf.stack(tables))


def invert(image: tf.Tensor, arg: tf.Tensor, fill: tf.Tensor, bicubic: tf.Tensor) -> tf.Tensor:
    return 255 - image


def posterize(image: tf.Tensor, arg: tf.Tensor, fill: tf.Tensor, bicubic: tf.Tensor) -> tf.Tensor:
    """Keep the ``arg`` (0..8) most significant bits (timm: unchanged from 8 bits)."""
    bits = tf.clip_by_value(tf.cast(arg, tf.int32), 0, 8)
    mask = 256 - tf.bitwise.left_shift(1, 8 - bits)
    return tf.cast(tf.bitwise.bitwise_and(tf.cast(image, tf.int32), mask), tf.uint8)


def solarize(image: tf.Tensor, arg: tf.Tensor, fill: tf.Tensor, bicubic: tf.Tensor) -> tf.Tensor:
    """ImageOps.solarize: values >= the threshold ``arg`` are inverted."""
    return tf.where(tf.cast(image, F64) < _f64(arg), image, 255 - image)


def solarize_add(image: tf.Tensor, arg: tf.Tensor, fill: tf.Tensor,
                 bicubic: tf.Tensor) -> tf.Tensor:
    """timm's solarize_add: values below 128 get ``arg`` added (capped at 255)."""
    x = tf.cast(image, tf.int32)
    added = tf.minimum(x + tf.cast(arg, tf.int32), 255)
    return tf.cast(tf.where(x < 128, added, x), tf.uint8)


def color(image: tf.Tensor, arg: tf.Tensor, fill: tf.Tensor, bicubic: tf.Tensor) -> tf.Tensor:
    """ImageEnhance.Color: blend with the grey (PIL luma) image."""
    grey = tf.repeat(_luma(image)[..., None], 3, axis=-1)
    return _blend(grey, image, arg)


def contrast(image: tf.Tensor, arg: tf.Tensor, fill: tf.Tensor, bicubic: tf.Tensor) -> tf.Tensor:
    """ImageEnhance.Contrast: blend with the mean luma, int(mean + 0.5)."""
    luma = _luma(image)
    mean = tf.cast(tf.reduce_sum(tf.cast(luma, tf.int64)), F64) / tf.cast(tf.size(luma), F64)
    level = tf.cast(tf.floor(mean + 0.5), tf.int32)
    return _blend(tf.fill(tf.shape(image), level), image, arg)


def brightness(image: tf.Tensor, arg: tf.Tensor, fill: tf.Tensor, bicubic: tf.Tensor) -> tf.Tensor:
    """ImageEnhance.Brightness: blend with black."""
    return _blend(tf.zeros_like(image), image, arg)


def sharpness(image: tf.Tensor, arg: tf.Tensor, fill: tf.Tensor, bicubic: tf.Tensor) -> tf.Tensor:
    """ImageEnhance.Sharpness: blend with PIL's SMOOTH filter (3x3, centre 5, sum 13; border kept).

    PIL sums in float32 and rounds half up; the integer sum / 13 is never a half, so integer
    rounding gives the same values whatever the summation order.
    """
    x = tf.cast(image, tf.int32)
    total = (x[:-2, :-2] + x[:-2, 1:-1] + x[:-2, 2:] + x[1:-1, :-2] + 5 * x[1:-1, 1:-1]
             + x[1:-1, 2:] + x[2:, :-2] + x[2:, 1:-1] + x[2:, 2:])
    smooth = (2 * total + 13) // 26
    inner = tf.pad(tf.ones_like(smooth), [[1, 1], [1, 1], [0, 0]]) > 0
    degenerate = tf.where(inner, tf.pad(smooth, [[1, 1], [1, 1], [0, 0]]), x)
    return _blend(degenerate, image, arg)


def rotate(image: tf.Tensor, arg: tf.Tensor, fill: tf.Tensor, bicubic: tf.Tensor) -> tf.Tensor:
    """Image.rotate(arg degrees, counter-clockwise) about (w / 2, h / 2), same size."""
    angle = -(tf.math.floormod(_f64(arg), 360.0) * (math.pi / 180.0))
    cos, sin = _round15(tf.cos(angle)), _round15(tf.sin(angle))
    cx = tf.cast(tf.shape(image)[1], F64) / 2.0
    cy = tf.cast(tf.shape(image)[0], F64) / 2.0
    a2 = cos * -cx + sin * -cy + 0.0 + cx
    a5 = -sin * -cx + cos * -cy + 0.0 + cy
    return _affine(image, [cos, sin, a2, -sin, cos, a5], fill, bicubic)


def shear_x(image: tf.Tensor, arg: tf.Tensor, fill: tf.Tensor, bicubic: tf.Tensor) -> tf.Tensor:
    return _affine(image, [1.0, arg, 0.0, 0.0, 1.0, 0.0], fill, bicubic, along="x")


def shear_y(image: tf.Tensor, arg: tf.Tensor, fill: tf.Tensor, bicubic: tf.Tensor) -> tf.Tensor:
    return _affine(image, [1.0, 0.0, 0.0, arg, 1.0, 0.0], fill, bicubic, along="y")


def translate_x_rel(image: tf.Tensor, arg: tf.Tensor, fill: tf.Tensor,
                    bicubic: tf.Tensor) -> tf.Tensor:
    """Shift by ``arg`` times the width (timm: pixels = pct * width)."""
    pixels = _f64(arg) * tf.cast(tf.shape(image)[1], F64)
    return _affine(image, [1.0, 0.0, pixels, 0.0, 1.0, 0.0], fill, bicubic, along="x")


def translate_y_rel(image: tf.Tensor, arg: tf.Tensor, fill: tf.Tensor,
                    bicubic: tf.Tensor) -> tf.Tensor:
    pixels = _f64(arg) * tf.cast(tf.shape(image)[0], F64)
    return _affine(image, [1.0, 0.0, 0.0, 0.0, 1.0, pixels], fill, bicubic, along="y")


# ----------------------------------------------------------------------------- levels
# timm's LEVEL_TO_ARG: (magnitude float64, negate bool) -> argument float64.

def _frac(m: tf.Tensor) -> tf.Tensor:
    return m / LEVEL_DENOM


def _sign(v: tf.Tensor, negate: tf.Tensor) -> tf.Tensor:
    return tf.where(negate, -v, v)


def _rotate_arg(m: tf.Tensor, negate: tf.Tensor) -> tf.Tensor:
    return _sign(_frac(m) * 30.0, negate)


def _shear_arg(m: tf.Tensor, negate: tf.Tensor) -> tf.Tensor:
    return _sign(_frac(m) * 0.3, negate)


def _translate_rel_arg(m: tf.Tensor, negate: tf.Tensor) -> tf.Tensor:
    return _sign(_frac(m) * TRANSLATE_PCT, negate)


def _enhance_arg(m: tf.Tensor, negate: tf.Tensor) -> tf.Tensor:
    return _frac(m) * 1.8 + 0.1


def _enhance_increasing_arg(m: tf.Tensor, negate: tf.Tensor) -> tf.Tensor:
    return tf.maximum(tf.constant(0.1, F64), 1.0 + _sign(_frac(m) * 0.9, negate))


def _posterize_arg(m: tf.Tensor, negate: tf.Tensor) -> tf.Tensor:
    return tf.floor(_frac(m) * 4.0)


def _posterize_increasing_arg(m: tf.Tensor, negate: tf.Tensor) -> tf.Tensor:
    return 4.0 - _posterize_arg(m, negate)


def _solarize_arg(m: tf.Tensor, negate: tf.Tensor) -> tf.Tensor:
    return tf.minimum(tf.constant(256.0, F64), tf.floor(_frac(m) * 256.0))


def _solarize_increasing_arg(m: tf.Tensor, negate: tf.Tensor) -> tf.Tensor:
    return 256.0 - _solarize_arg(m, negate)


def _solarize_add_arg(m: tf.Tensor, negate: tf.Tensor) -> tf.Tensor:
    return tf.minimum(tf.constant(128.0, F64), tf.floor(_frac(m) * 110.0))


def _no_arg(m: tf.Tensor, negate: tf.Tensor) -> tf.Tensor:
    return tf.zeros([], F64)


OpFn = Callable[[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor], tf.Tensor]
LevelFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]


class Op(NamedTuple):
    """One timm op: the image function, its magnitude -> argument mapping, whether it has one."""
    fn: OpFn
    level_to_arg: LevelFn
    has_arg: bool


OPS: dict[str, Op] = {
    "AutoContrast": Op(auto_contrast, _no_arg, False),
    "Equalize": Op(equalize, _no_arg, False),
    "Invert": Op(invert, _no_arg, False),
    "Rotate": Op(rotate, _rotate_arg, True),
    "Posterize": Op(posterize, _posterize_arg, True),
    "PosterizeIncreasing": Op(posterize, _posterize_increasing_arg, True),
    "Solarize": Op(solarize, _solarize_arg, True),
    "SolarizeIncreasing": Op(solarize, _solarize_increasing_arg, True),
    "SolarizeAdd": Op(solarize_add, _solarize_add_arg, True),
    "Color": Op(color, _enhance_arg, True),
    "ColorIncreasing": Op(color, _enhance_increasing_arg, True),
    "Contrast": Op(contrast, _enhance_arg, True),
    "ContrastIncreasing": Op(contrast, _enhance_increasing_arg, True),
    "Brightness": Op(brightness, _enhance_arg, True),
    "BrightnessIncreasing": Op(brightness, _enhance_increasing_arg, True),
    "Sharpness": Op(sharpness, _enhance_arg, True),
    "SharpnessIncreasing": Op(sharpness, _enhance_increasing_arg, True),
    "ShearX": Op(shear_x, _shear_arg, True),
    "ShearY": Op(shear_y, _shear_arg, True),
    "TranslateXRel": Op(translate_x_rel, _translate_rel_arg, True),
    "TranslateYRel": Op(translate_y_rel, _translate_rel_arg, True),
}


def transforms(increasing: bool) -> tuple[str, ...]:
    """The op list timm's ``rand`` uses: the increasing set with ``inc1``."""
    return INCREASING_TRANSFORMS if increasing else TRANSFORMS


def _bicubic_flag(interpolation: str, seed: tf.Tensor | None) -> bool | tf.Tensor:
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    if interpolation != "random":
        return interpolation == "bicubic"
    seed = tf.constant([0, 0], tf.int64) if seed is None else seed
    return tf.random.stateless_uniform([], seed) < 0.5


def op_argument(name: str, magnitude: float | tf.Tensor,
                negate: bool | tf.Tensor = False) -> tf.Tensor:
    """timm's argument for op ``name`` at ``magnitude`` (not clipped here), float64."""
    return OPS[name].level_to_arg(_f64(magnitude), tf.convert_to_tensor(negate, tf.bool))


def apply_op(name: str, image: tf.Tensor, magnitude: float | tf.Tensor,
             negate: bool | tf.Tensor = False, interpolation: str = "bicubic",
             fill: Sequence[int] = FILL_COLOUR, seed: tf.Tensor | None = None) -> tf.Tensor:
    """One named op at ``magnitude`` (clipped to [0, 10]) with a given sign, as timm's op applies.

    ``seed`` only picks the resampling filter for ``interpolation="random"``.
    """
    m = tf.clip_by_value(_f64(magnitude), 0.0, MAX_MAGNITUDE)
    op = OPS[name]
    arg = op.level_to_arg(m, tf.convert_to_tensor(negate, tf.bool))
    return op.fn(tf.convert_to_tensor(image, tf.uint8), arg, tf.constant(fill, tf.uint8),
                 _bicubic_flag(interpolation, seed))


# ----------------------------------------------------------------------------- policy

class Draws(NamedTuple):
    """The random choices of one image, per layer: op index, applied, magnitude, sign, bicubic."""
    op: tf.Tensor          # int32 [n]
    apply: tf.Tensor       # bool [n]
    magnitude: tf.Tensor   # float64 [n], clipped to [0, 10]
    negate: tf.Tensor      # bool [n]
    coin: tf.Tensor        # bool [n]: bicubic when interpolation == "random"


def draw(seed: tf.Tensor, num_layers: int, num_ops: int, magnitude: float, magnitude_std: float,
         prob: float) -> Draws:
    """timm's per-image randomness: ops uniform with replacement, each applied with probability
    ``prob``, magnitude N(magnitude, magnitude_std) (U(0, magnitude) for an infinite std) clipped
    to [0, 10], a fair sign. Stateless in ``seed`` [2]."""
    seeds = tf.random.experimental.stateless_split(seed, 5)
    s_op, s_apply, s_mag, s_sign, s_coin = tf.unstack(seeds)
    n = [num_layers]
    op = tf.random.stateless_uniform(n, s_op, 0, num_ops, tf.int32)
    if prob < 1.0:   # timm: skipped when random() > p
        apply = tf.random.stateless_uniform(n, s_apply, dtype=F64) <= prob
    else:
        apply = tf.ones(n, tf.bool)
    if math.isinf(magnitude_std):
        mag = tf.random.stateless_uniform(n, s_mag, 0.0, float(magnitude), dtype=F64)
    elif magnitude_std > 0:
        mag = magnitude + magnitude_std * tf.random.stateless_normal(n, s_mag, dtype=F64)
    else:
        mag = tf.fill(n, tf.constant(float(magnitude), F64))
    mag = tf.clip_by_value(mag, 0.0, MAX_MAGNITUDE)
    negate = tf.random.stateless_uniform(n, s_sign, dtype=F64) > 0.5
    coin = tf.random.stateless_uniform(n, s_coin, dtype=F64) < 0.5
    return Draws(op, apply, mag, negate, coin)


def _branch(op: Op, image: tf.Tensor, magnitude: tf.Tensor, negate: tf.Tensor, fill: tf.Tensor,
            bicubic: bool | tf.Tensor) -> Callable[[], tf.Tensor]:
    return lambda: op.fn(image, op.level_to_arg(magnitude, negate), fill, bicubic)


def rand_augment(image: tf.Tensor, seed: tf.Tensor, num_layers: int = 2, magnitude: float = 9,
                 magnitude_std: float = 0.5, prob: float = 0.5, increasing: bool = True,
                 interpolation: str = "bicubic", fill: Sequence[int] = FILL_COLOUR) -> tf.Tensor:
    """timm RandAugment on one uint8 image [H, W, 3]; stateless given ``seed`` (shape [2]).

    Defaults are DeiT's ``rand-m9-mstd0.5-inc1`` with bicubic resampling; the keyword arguments
    are what :func:`parse_randaugment` returns.
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    ops = [OPS[name] for name in transforms(increasing)]
    d = draw(seed, num_layers, len(ops), magnitude, magnitude_std, prob)
    fill_t = tf.constant(fill, tf.uint8)
    static_shape = image.shape
    for i in range(num_layers):
        bicubic = d.coin[i] if interpolation == "random" else interpolation == "bicubic"
        branches = [_branch(op, image, d.magnitude[i], d.negate[i], fill_t, bicubic) for op in ops]
        image = tf.cond(d.apply[i], lambda b=branches, k=d.op[i]: tf.switch_case(k, b),
                        lambda x=image: x)
        image.set_shape(static_shape)
    return image


def parse_randaugment(spec: str) -> dict:
    """timm RandAugment spec -> keyword arguments of :func:`rand_augment`.

    Parsed as timm's ``rand_augment_transform`` does (``"rand-m9-mstd0.5-inc1"``: m 9, n 2,
    mstd 0.5, p 0.5, increasing ops); sections timm would treat differently from here are refused.
    """
    parts = spec.split("-")
    if parts[0] != "rand":
        raise ValueError(f"RandAugment spec must start with 'rand', got {spec!r}")
    out = {"num_layers": 2, "magnitude": 10, "magnitude_std": 0.0, "prob": 0.5,
           "increasing": False}
    seen = set()
    for part in parts[1:]:
        match = re.fullmatch(r"(\D*)(\d.*)", part)
        key, value = match.groups() if match else (part, "")
        if key in ("mmax",) or key.startswith("t"):
            raise ValueError(f"RandAugment section {part!r} in {spec!r} is a timm option this "
                             f"implementation does not support (mmax, t<transform set>)")
        if key not in ("m", "n", "mstd", "p", "inc") or not value:
            raise ValueError(f"unknown RandAugment section {part!r} in {spec!r}; expected "
                             f"m<int>, n<int>, mstd<float>, p<float> or inc<0|1>")
        if key in seen:
            raise ValueError(f"RandAugment section {key!r} given twice in {spec!r}")
        seen.add(key)
        try:
            if key == "m":
                out["magnitude"] = int(value)
            elif key == "n":
                out["num_layers"] = int(value)
            elif key == "p":
                out["prob"] = float(value)
            elif key == "inc":
                out["increasing"] = bool(int(value))
            else:
                std = float(value)
                out["magnitude_std"] = math.inf if std > 100 else std
        except ValueError:
            raise ValueError(f"RandAugment section {part!r} in {spec!r}: {value!r} is not "
                             f"{'an integer' if key in ('m', 'n', 'inc') else 'a number'} "
                             f"(timm parses it that way)") from None
    return out
