"""RandAugment (Cubuk et al. 2020) on uint8 images as TensorFlow ops, timm-flavoured.

Why: DeiT's recipe trains with timm's ``rand-m9-mstd0.5-inc1``: two ops drawn with replacement
per image, each applied with probability 0.5, at a magnitude drawn from N(9, 0.5) clipped to
[0, 10]. Ops use timm's "increasing" mappings (a larger magnitude is always a stronger change,
and magnitude 0 leaves the image unchanged for every op with a magnitude), with a random sign
for the signed ones (rotate, shear, translate, colour enhancements). Geometric ops fill the
uncovered area with the ImageNet mean colour, like timm.

Ops and magnitude (level = magnitude / 10):
identity, autocontrast, equalize, rotate (30 * level degrees), solarize (threshold
256 - 256 * level), color / contrast / brightness / sharpness (factor 1 +- 0.9 * level),
posterize (8 - 4 * level bits), shear_x / shear_y (0.3 * level), translate_x / translate_y
(0.45 * level of the side).
"""

from __future__ import annotations

import re
from typing import Callable

import tensorflow as tf

from saitjax.data.preprocess import hide_gpus_from_tf

hide_gpus_from_tf()

FILL_COLOUR = (124.0, 116.0, 104.0)   # ImageNet mean in 0..255, timm's fill for geometric ops
MAX_MAGNITUDE = 10.0


# ----------------------------------------------------------------------------- helpers

def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """PIL ImageEnhance: degenerate + factor * (image - degenerate), rounded and clipped."""
    deg = tf.cast(degenerate, tf.float32)
    out = deg + factor * (tf.cast(image, tf.float32) - deg)
    return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)


def _gray(image: tf.Tensor) -> tf.Tensor:
    """ITU-R 601 luma, like PIL's convert("L"); float32 [H, W, 1]."""
    return tf.image.rgb_to_grayscale(tf.cast(image, tf.float32))


def _signed(level: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    return tf.where(tf.random.stateless_uniform([], seed) < 0.5, -level, level)


def _affine(image: tf.Tensor, matrix: tf.Tensor) -> tf.Tensor:
    """Inverse-mapped affine warp (output pixel -> input point), bilinear, mean-colour fill.

    ``matrix`` is [a0, a1, a2, b0, b1, b2]: input = (a0 x + a1 y + a2, b0 x + b1 y + b2).
    A ones channel is warped along (fill 0) to blend the fill colour at the borders smoothly.
    """
    x = tf.cast(image, tf.float32)
    x = tf.concat([x, tf.ones_like(x[..., :1])], axis=-1)[None]
    transform = tf.concat([tf.cast(matrix, tf.float32), tf.zeros([2], tf.float32)], 0)[None]
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=x, transforms=transform, output_shape=tf.shape(image)[:2],
        interpolation="BILINEAR", fill_mode="CONSTANT", fill_value=0.0)[0]
    rgb, valid = out[..., :3], out[..., 3:]
    out = rgb + (1.0 - valid) * tf.constant(FILL_COLOUR, tf.float32)
    return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)


# ----------------------------------------------------------------------------- ops
# Every op: (uint8 image [H, W, 3], level in [0, 1], seed [2]) -> uint8 image [H, W, 3].

def identity(image: tf.Tensor, level: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    return image


def autocontrast(image: tf.Tensor, level: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Stretch each channel to the full 0..255 range (channels with one value unchanged)."""
    x = tf.cast(image, tf.float32)
    lo = tf.reduce_min(x, axis=[0, 1], keepdims=True)
    hi = tf.reduce_max(x, axis=[0, 1], keepdims=True)
    scale = 255.0 / tf.maximum(hi - lo, 1.0)
    out = tf.where(hi > lo, tf.floor((x - lo) * scale), x)
    return tf.cast(tf.clip_by_value(out, 0.0, 255.0), tf.uint8)


def _equalize_channel(c: tf.Tensor) -> tf.Tensor:
    c = tf.cast(c, tf.int32)
    hist = tf.math.bincount(c, minlength=256, maxlength=256)
    last = tf.reduce_max(tf.where(hist > 0, tf.range(256), -1))
    step = (tf.reduce_sum(hist) - tf.gather(hist, last)) // 255

    def apply() -> tf.Tensor:
        lut = (tf.cumsum(hist, exclusive=True) + step // 2) // tf.maximum(step, 1)
        return tf.gather(tf.clip_by_value(lut, 0, 255), c)

    return tf.cond(step > 0, apply, lambda: c)


def equalize(image: tf.Tensor, level: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Per-channel histogram equalisation with PIL's lookup table."""
    channels = [_equalize_channel(image[..., i]) for i in range(3)]
    return tf.cast(tf.stack(channels, axis=-1), tf.uint8)


def rotate(image: tf.Tensor, level: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    angle = _signed(level * 30.0, seed) * (3.141592653589793 / 180.0)
    h = tf.cast(tf.shape(image)[0], tf.float32)
    w = tf.cast(tf.shape(image)[1], tf.float32)
    cy, cx = (h - 1) / 2, (w - 1) / 2
    c, s = tf.cos(angle), tf.sin(angle)
    return _affine(image, tf.stack([c, -s, cx - c * cx + s * cy, s, c, cy - s * cx - c * cy]))


def solarize(image: tf.Tensor, level: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    threshold = 256.0 - level * 256.0
    return tf.where(tf.cast(image, tf.float32) >= threshold, 255 - image, image)


def posterize(image: tf.Tensor, level: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    shift = tf.cast(tf.round(level * 4.0), tf.uint8)   # keep 8 - shift bits
    return tf.bitwise.left_shift(tf.bitwise.right_shift(image, shift), shift)


def _factor(level: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    return 1.0 + _signed(level * 0.9, seed)


def color(image: tf.Tensor, level: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    return _blend(tf.image.grayscale_to_rgb(_gray(image)), image, _factor(level, seed))


def contrast(image: tf.Tensor, level: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    mean = tf.floor(tf.reduce_mean(_gray(image)) + 0.5)
    return _blend(tf.fill(tf.shape(image), mean), image, _factor(level, seed))


def brightness(image: tf.Tensor, level: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    return _blend(tf.zeros_like(image), image, _factor(level, seed))


def sharpness(image: tf.Tensor, level: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Blend with PIL's SMOOTH-filtered image (border pixels kept as they are)."""
    x = tf.cast(image, tf.float32)
    kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
    smooth = tf.nn.depthwise_conv2d(x[None], kernel, [1, 1, 1, 1], "VALID")[0]
    smooth = tf.round(smooth)
    inner = tf.pad(tf.ones_like(smooth), [[1, 1], [1, 1], [0, 0]])
    degenerate = tf.where(inner > 0, tf.pad(smooth, [[1, 1], [1, 1], [0, 0]]), x)
    return _blend(degenerate, image, _factor(level, seed))


def shear_x(image: tf.Tensor, level: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    s = _signed(level * 0.3, seed)
    return _affine(image, tf.stack([1.0, s, 0.0, 0.0, 1.0, 0.0]))


def shear_y(image: tf.Tensor, level: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    s = _signed(level * 0.3, seed)
    return _affine(image, tf.stack([1.0, 0.0, 0.0, s, 1.0, 0.0]))


def translate_x(image: tf.Tensor, level: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    pixels = _signed(level * 0.45, seed) * tf.cast(tf.shape(image)[1], tf.float32)
    return _affine(image, tf.stack([1.0, 0.0, pixels, 0.0, 1.0, 0.0]))


def translate_y(image: tf.Tensor, level: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    pixels = _signed(level * 0.45, seed) * tf.cast(tf.shape(image)[0], tf.float32)
    return _affine(image, tf.stack([1.0, 0.0, 0.0, 0.0, 1.0, pixels]))


OPS: dict[str, Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tf.Tensor]] = {
    "identity": identity, "autocontrast": autocontrast, "equalize": equalize, "rotate": rotate,
    "solarize": solarize, "color": color, "posterize": posterize, "contrast": contrast,
    "brightness": brightness, "sharpness": sharpness, "shear_x": shear_x, "shear_y": shear_y,
    "translate_x": translate_x, "translate_y": translate_y,
}


# ----------------------------------------------------------------------------- policy

def apply_op(name: str, image: tf.Tensor, magnitude: float | tf.Tensor,
             seed: tf.Tensor | None = None) -> tf.Tensor:
    """One named op at ``magnitude`` in [0, 10] (for tests and visual checks)."""
    seed = tf.constant([0, 0], tf.int64) if seed is None else seed
    level = tf.clip_by_value(tf.cast(magnitude, tf.float32), 0.0, MAX_MAGNITUDE) / MAX_MAGNITUDE
    return OPS[name](tf.convert_to_tensor(image, tf.uint8), level, seed)


def rand_augment(image: tf.Tensor, seed: tf.Tensor, num_layers: int = 2,
                 magnitude: float = 9.0, magnitude_std: float = 0.5,
                 prob: float = 0.5) -> tf.Tensor:
    """RandAugment on one uint8 image [H, W, 3]; stateless given ``seed`` (shape [2])."""
    branches = list(OPS.values())
    seeds = tf.random.experimental.stateless_split(seed, 1 + 3 * num_layers)
    ops = tf.random.stateless_uniform([num_layers], seeds[0], 0, len(branches), tf.int32)
    static_shape = image.shape
    for i in range(num_layers):
        s_apply, s_mag, s_op = tf.unstack(seeds[1 + 3 * i: 4 + 3 * i])
        mag = magnitude + magnitude_std * tf.random.stateless_normal([], s_mag)
        level = tf.clip_by_value(mag, 0.0, MAX_MAGNITUDE) / MAX_MAGNITUDE
        chosen = tf.switch_case(
            ops[i], [(lambda f=f, x=image, lv=level, s=s_op: f(x, lv, s)) for f in branches])
        apply = tf.random.stateless_uniform([], s_apply) < prob
        image = tf.where(apply, chosen, image)
        image.set_shape(static_shape)
    return image


def parse_randaugment(spec: str) -> dict:
    """timm-style spec -> kwargs of :func:`rand_augment`, e.g. ``"rand-m9-mstd0.5-inc1"``.

    Fields: ``m`` magnitude, ``n`` num_layers, ``mstd`` magnitude std, ``p`` op probability;
    ``inc`` is accepted (the ops here always use the increasing mappings).
    """
    parts = spec.split("-")
    if parts[0] != "rand":
        raise ValueError(f"RandAugment spec must start with 'rand', got {spec!r}")
    out = {"num_layers": 2, "magnitude": 9.0, "magnitude_std": 0.5, "prob": 0.5}
    keys = {"m": "magnitude", "n": "num_layers", "mstd": "magnitude_std", "p": "prob"}
    for part in parts[1:]:
        match = re.fullmatch(r"([a-z]+)([0-9.]+)", part)
        if not match or match.group(1) not in {*keys, "inc"}:
            raise ValueError(f"unknown RandAugment field {part!r} in {spec!r}; "
                             f"expected m<float>, n<int>, mstd<float>, p<float> or inc<0|1>")
        key, value = match.groups()
        if key != "inc":
            out[keys[key]] = int(value) if key == "n" else float(value)
    return out
