"""DeiT-style image preprocessing as TensorFlow ops for tf.data pipelines.

Why TF: input pipelines run on the host CPUs next to the accelerator step, in parallel, and
``tf.data`` is what TFDS gives us. The recipe follows DeiT / timm so that models pretrained with
it (and the normalisation of their weights) see the same inputs:

* train: random resized crop (scale (0.08, 1), ratio (3/4, 4/3), 10 attempts, then a centre
  crop fallback) -> horizontal flip -> optional RandAugment -> normalise;
* eval: resize the shorter side to ``image_size / crop_pct`` -> centre crop -> normalise.

All randomness is stateless (``seed`` tensors of shape [2]), so a pipeline is reproducible.
Importing this module hides GPUs from TensorFlow so it never takes memory from JAX.
"""

from __future__ import annotations

import math
from typing import Sequence

import tensorflow as tf


def hide_gpus_from_tf() -> None:
    """Keep TensorFlow off the accelerators: JAX owns them, TF only feeds data from the CPU."""
    try:
        tf.config.set_visible_devices([], "GPU")
    except (RuntimeError, ValueError):  # already initialised: nothing more we can do
        pass


hide_gpus_from_tf()

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
_METHODS = ("bilinear", "bicubic", "area", "lanczos3", "nearest")


def _check_method(method: str) -> str:
    if method not in _METHODS:
        raise ValueError(f"interpolation must be one of {_METHODS}, got {method!r}")
    return method


def to_rgb(image: tf.Tensor) -> tf.Tensor:
    """Grayscale -> 3 channels, RGBA -> RGB; other images unchanged."""
    channels = image.shape[-1]
    if channels == 1:
        return tf.image.grayscale_to_rgb(image)
    if channels == 4:
        return image[..., :3]
    return image


def normalize(image: tf.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> tf.Tensor:
    """Pixel values in [0, 255] -> float32 ``(x / 255 - mean) / std`` (mean/std on [0, 1] scale)."""
    image = tf.cast(image, tf.float32) / 255.0
    mean = tf.constant(mean, tf.float32)
    std = tf.constant(std, tf.float32)
    return (image - mean) / std


def random_crop_window(seed: tf.Tensor, shape: tf.Tensor,
                       scale: Sequence[float] = (0.08, 1.0),
                       ratio: Sequence[float] = (3 / 4, 4 / 3),
                       attempts: int = 10) -> tf.Tensor:
    """timm's RandomResizedCrop window [y, x, h, w] for an image of ``shape`` [H, W, ...].

    Draws ``attempts`` (area, log-aspect) candidates at once and takes the first that fits;
    if none fits, falls back to the largest centre crop with an aspect ratio inside ``ratio``.
    """
    if not 0 < scale[0] <= scale[1] or not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"bad crop scale {scale} or ratio {ratio}")
    height = tf.cast(shape[0], tf.float32)
    width = tf.cast(shape[1], tf.float32)
    s_area, s_ratio, s_y, s_x = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
    area = height * width * tf.random.stateless_uniform([attempts], s_area, scale[0], scale[1])
    log_r = tf.random.stateless_uniform([attempts], s_ratio, math.log(ratio[0]),
                                        math.log(ratio[1]))
    aspect = tf.exp(log_r)
    w = tf.round(tf.sqrt(area * aspect))
    h = tf.round(tf.sqrt(area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = tf.argmax(tf.cast(fits, tf.int32))
    y = tf.floor(tf.random.stateless_uniform([attempts], s_y) * (height - h + 1))
    x = tf.floor(tf.random.stateless_uniform([attempts], s_x) * (width - w + 1))
    random_window = tf.stack([y[first], x[first], h[first], w[first]])

    in_ratio = width / height
    fb_w = tf.where(in_ratio > ratio[1], tf.round(height * ratio[1]), width)
    fb_h = tf.where(in_ratio < ratio[0], tf.round(width / ratio[0]), height)
    fallback = tf.stack([tf.floor((height - fb_h) / 2), tf.floor((width - fb_w) / 2), fb_h, fb_w])
    window = tf.where(tf.reduce_any(fits), random_window, fallback)
    return tf.cast(window, tf.int32)


def _resize(image: tf.Tensor, size: tf.Tensor | Sequence[int], method: str) -> tf.Tensor:
    """Antialiased resize returning float32 in [0, 255] (bicubic overshoot clipped)."""
    out = tf.image.resize(tf.cast(image, tf.float32), size, method=_check_method(method),
                          antialias=method != "nearest")
    return tf.clip_by_value(out, 0.0, 255.0)


def random_resized_crop(image: tf.Tensor, seed: tf.Tensor, size: int,
                        scale: Sequence[float] = (0.08, 1.0),
                        ratio: Sequence[float] = (3 / 4, 4 / 3),
                        method: str = "bicubic") -> tf.Tensor:
    """Decoded image [H, W, C] -> float32 [size, size, C] in [0, 255]."""
    y, x, h, w = tf.unstack(random_crop_window(seed, tf.shape(image), scale, ratio))
    crop = tf.image.crop_to_bounding_box(image, y, x, h, w)
    return _resize(crop, [size, size], method)


def decode_and_random_crop_jpeg(jpeg: tf.Tensor, seed: tf.Tensor, size: int,
                                scale: Sequence[float] = (0.08, 1.0),
                                ratio: Sequence[float] = (3 / 4, 4 / 3),
                                method: str = "bicubic") -> tf.Tensor:
    """Fused JPEG decode + random resized crop: decodes only the window (fast for ImageNet)."""
    shape = tf.image.extract_jpeg_shape(jpeg)
    window = random_crop_window(seed, shape, scale, ratio)
    crop = tf.image.decode_and_crop_jpeg(jpeg, window, channels=3)
    return _resize(crop, [size, size], method)


def random_flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Left-right flip with probability 1/2."""
    flip = tf.random.stateless_uniform([], seed) < 0.5
    return tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)


def train_preprocess(image: tf.Tensor, seed: tf.Tensor, *, image_size: int,
                     crop_scale: Sequence[float] = (0.08, 1.0),
                     crop_ratio: Sequence[float] = (3 / 4, 4 / 3),
                     hflip: bool = True, randaugment: str | None = None,
                     mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                     interpolation: str = "bicubic") -> tf.Tensor:
    """DeiT train transform: uint8 image [H, W, C] (or JPEG bytes) -> float32 [S, S, 3].

    ``randaugment`` is a timm-style spec such as ``"rand-m9-mstd0.5"`` (``None``: off).
    For images already at the target size (``saitjax_shapes``) use a milder ``crop_scale``,
    e.g. (0.35, 1).
    """
    s_crop, s_flip, s_ra = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    if image.dtype == tf.string:
        image = decode_and_random_crop_jpeg(image, s_crop, image_size, crop_scale, crop_ratio,
                                            interpolation)
    else:
        image = random_resized_crop(to_rgb(image), s_crop, image_size, crop_scale, crop_ratio,
                                    interpolation)
    if hflip:
        image = random_flip(image, s_flip)
    if randaugment:
        from saitjax.data.randaugment import INTERPOLATIONS, parse_randaugment, rand_augment
        image = tf.cast(tf.round(image), tf.uint8)
        # as timm: rotated/sheared/translated corners take the data mean (its ``img_mean``), and
        # the ops resample with the train interpolation
        kwargs = {"fill": tuple(min(255, round(255 * m)) for m in mean), **parse_randaugment(randaugment)}
        if interpolation in INTERPOLATIONS:
            kwargs.setdefault("interpolation", interpolation)
        image = rand_augment(image, s_ra, **kwargs)
    return normalize(image, mean, std)


def resize_and_center_crop(image: tf.Tensor, image_size: int, crop_pct: float = 0.875,
                           method: str = "bicubic") -> tf.Tensor:
    """timm eval geometry: shorter side -> floor(image_size / crop_pct), then centre crop.

    Returns float32 [image_size, image_size, C] in the input's value range. With
    ``crop_pct=1.0`` and an image already at ``image_size`` it is the identity.
    """
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    scale_size = math.floor(image_size / crop_pct)
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    short = tf.minimum(h, w)
    new_h = tf.where(h == short, scale_size, (scale_size * h) // short)
    new_w = tf.where(w == short, scale_size, (scale_size * w) // short)
    same = tf.logical_and(tf.equal(new_h, h), tf.equal(new_w, w))
    resized = tf.cond(same, lambda: tf.cast(image, tf.float32),
                      lambda: _resize(image, tf.stack([new_h, new_w]), method))
    top = tf.cast(tf.round(tf.cast(new_h - image_size, tf.float32) / 2), tf.int32)
    left = tf.cast(tf.round(tf.cast(new_w - image_size, tf.float32) / 2), tf.int32)
    return tf.image.crop_to_bounding_box(resized, top, left, image_size, image_size)


def eval_preprocess(image: tf.Tensor, *, image_size: int, crop_pct: float = 0.875,
                    mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                    interpolation: str = "bicubic",
                    mask: tf.Tensor | None = None) -> tf.Tensor | tuple[tf.Tensor, tf.Tensor]:
    """DeiT eval transform: uint8 [H, W, C] -> float32 [S, S, 3].

    With ``mask`` ([H, W] or [H, W, 1]) also returns it through the same resize + centre crop,
    as uint8 [S, S] in {0, 1}, so patch masks line up with the image's tokens.
    """
    out = normalize(resize_and_center_crop(to_rgb(image), image_size, crop_pct, interpolation),
                    mean, std)
    if mask is None:
        return out
    if mask.shape.rank == 2:
        mask = mask[..., None]
    m = resize_and_center_crop(tf.cast(mask > 0, tf.float32), image_size, crop_pct, "bilinear")
    return out, tf.cast(m[..., 0] >= 0.5, tf.uint8)
