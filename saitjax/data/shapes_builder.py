"""``saitjax_shapes``: a procedurally generated TFDS dataset for the token-pruning demo and tests.

Why it exists: token pruning pays off when only part of an image matters. Each image shows ONE
filled object (the class: circle, square, triangle, cross, star, ring, crescent, hourglass) of a
random bright colour at a random position, scale (25-55 % of the side) and rotation over a
darker cluttered background (smooth colour gradient and blotches, pixel noise, thin lines, dots
and small blobs that are all much smaller or thinner than any object). The object is always
clearly brighter than what lies under it, so the task is clutter-robust shape recognition, not a
hunt for a hidden object: a ViT with width 96, depth 4 and 8 px patches reached 81 % test top-1 after 800 steps of batch 64 (~3 min on 2 CPU
cores; 90 % after 1200). The pixel mask of the object is stored too, so one can measure whether
the tokens a method keeps fall on the object (see :func:`patch_mask`). Generation is
deterministic, needs no network and no manual download: ~20 s for the default config.

    builder = build_shapes_dataset("/tmp/tfds")              # 64 px, 10000 train / 2000 test
    builder = build_shapes_dataset("/tmp/tfds", "tiny")      # 32 px, 512 / 128, for tests
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import os
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

from saitjax.data import preprocess as _preprocess  # noqa: F401  (imports TF, hides its GPUs)
from saitjax.data.object_masks import patch_mask, patch_masks  # noqa: F401  (re-exported)

import tensorflow_datasets as tfds  # noqa: E402  (after TF is configured)

CLASS_NAMES = ("circle", "square", "triangle", "cross", "star", "ring", "crescent", "hourglass")
SPLIT_IDS = {"train": 0, "test": 1}
MIN_SIZE, MAX_SIZE = 0.25, 0.55     # object diameter as a fraction of the image side
MAX_DISTRACTOR = 0.12               # blobs/dots: at most this fraction of the side (< MIN_SIZE)
MIN_CONTRAST = 110.0                # object luma exceeds the background under it by this much
BACKGROUND_MAX = 110.0              # background gradient colours are drawn in [0, this]
_SS = 4                             # supersampling factor for anti-aliased drawing


# ----------------------------------------------------------------------------- rendering (numpy)

def _rot(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return points @ np.array([[c, s], [-s, c]])


def _regular(n: int, radius: float, phase: float = 0.0) -> np.ndarray:
    t = phase + 2 * np.pi * np.arange(n) / n
    return radius * np.stack([np.sin(t), -np.cos(t)], axis=1)


def _shape_polygons(label: int, angle: float) -> list[tuple[np.ndarray, int]]:
    """Polygons (unit bounding circle, centred at 0) with fill 255 (add) or 0 (cut)."""
    name = CLASS_NAMES[label]
    if name == "square":
        polys = [(_regular(4, 1.0, np.pi / 4), 255)]
    elif name == "triangle":
        polys = [(_regular(3, 1.0), 255)]
    elif name == "cross":
        a, w = 1.0, 0.32
        pts = [(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a), (-w, a), (-w, w),
               (-a, w), (-a, -w), (-w, -w)]
        polys = [(np.array(pts), 255)]
    elif name == "star":
        outer, inner = _regular(5, 1.0), _regular(5, 0.42, np.pi / 5)
        polys = [(np.stack([outer, inner], axis=1).reshape(10, 2), 255)]
    elif name == "hourglass":
        w, h = 0.75, 0.95
        polys = [(np.array([(-w, -h), (w, -h), (0, 0.05)]), 255),
                 (np.array([(-w, h), (w, h), (0, -0.05)]), 255)]
    else:  # round shapes are drawn as many-sided polygons so one code path rotates them all
        circle = _regular(64, 1.0)
        if name == "circle":
            polys = [(circle, 255)]
        elif name == "ring":
            polys = [(circle, 255), (_regular(64, 0.55), 0)]
        elif name == "crescent":
            polys = [(circle, 255), (_regular(64, 0.85) + np.array([0.45, 0.0]), 0)]
        else:
            raise ValueError(f"unknown shape {name}")
    return [(_rot(p, angle), fill) for p, fill in polys]


def _luma(rgb: np.ndarray) -> float:
    return float(np.dot(rgb, (0.299, 0.587, 0.114)))


def _downsample(canvas: Image.Image) -> np.ndarray:
    """Box-filter the supersampled canvas back to the output size: anti-aliased alpha in [0, 1]."""
    return np.asarray(canvas.reduce(_SS), dtype=np.float32) * np.float32(1 / 255)


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    grid = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    return grid[0], grid[1]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth two-colour gradient plus a low-frequency blotch field; float32 [H, W, 3].

    Colours stay at or below ``BACKGROUND_MAX`` so the (brighter) object stands out in luma.
    """
    c0, c1 = rng.uniform(0, BACKGROUND_MAX, size=(2, 3))
    theta = rng.uniform(0, 2 * np.pi)
    yy, xx = _grid(size)
    t = (np.cos(theta) * (xx - 0.5) + np.sin(theta) * (yy - 0.5)) * np.sqrt(2) + 0.5
    img = c0 + np.clip(t, 0, 1)[..., None] * (c1 - c0)
    low = rng.normal(0, 1, size=(4, 4)).astype(np.float32)  # 4x4 field, bilinearly upsampled
    up = np.asarray(Image.fromarray(low).resize((size, size), Image.BILINEAR))
    img += 18.0 * up[..., None] * rng.uniform(-1, 1, size=3)
    return img.astype(np.float32)


def _draw_distractors(rng: np.random.Generator, draw: ImageDraw.ImageDraw, s: int) -> None:
    """Thin lines, dots and small blobs on the supersampled canvas (side ``s``)."""
    for _ in range(int(rng.integers(3, 9))):
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        kind = rng.integers(3)
        if kind == 0:      # thin line, 1 px wide at the output resolution
            p0 = rng.uniform(0, s, 2)
            length = rng.uniform(0.15, 0.6) * s
            ang = rng.uniform(0, 2 * np.pi)
            p1 = p0 + length * np.array([np.cos(ang), np.sin(ang)])
            draw.line([tuple(p0), tuple(p1)], fill=colour, width=_SS)
        else:              # dot (radius <= 2 px) or small elliptic blob (< MIN_SIZE)
            r_max = 2.0 * _SS if kind == 1 else 0.5 * MAX_DISTRACTOR * s
            rx, ry = rng.uniform(0.5 * _SS, r_max, 2)
            cx, cy = rng.uniform(0, s, 2)
            draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=colour)


def render_example(rng: np.random.Generator, label: int, size: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draws one example: (image uint8 [H, W, 3], mask uint8 [H, W, 1], bbox float32 yxyx).

    Everything is drawn once on a ``_SS``-times supersampled canvas and box-filtered down, which
    anti-aliases edges; the object mask is the down-sampled object coverage >= 0.5.
    """
    s = size * _SS
    bg = _background(rng, size)
    canvas = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8)).resize((s, s), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    _draw_distractors(rng, draw, s)

    diameter = rng.uniform(MIN_SIZE, MAX_SIZE) * size
    radius = diameter / 2
    centre = rng.uniform(radius, size - radius, size=2)
    angle = rng.uniform(0, 2 * np.pi)
    polys = [([tuple(p) for p in (poly * radius + centre) * _SS], fill)
             for poly, fill in _shape_polygons(label, angle)]
    obj = Image.new("L", (s, s), 0)
    obj_draw = ImageDraw.Draw(obj)
    for pts, fill in polys:
        obj_draw.polygon(pts, fill=fill)
    alpha = _downsample(obj)

    # Object colour: random, but far enough from the background under it to stay visible.
    under = _luma(bg[alpha > 0.5].mean(axis=0))
    for _ in range(64):
        colour = rng.uniform(60, 255, size=3)
        if _luma(colour) - under > MIN_CONTRAST:
            break
    else:  # (rare) lift the last draw until it is bright enough
        colour = np.clip(colour + (under + MIN_CONTRAST - _luma(colour)), 0, 255)
    img = np.asarray(canvas.reduce(_SS), dtype=np.float32)
    img += alpha[..., None] * (colour.astype(np.float32) - img)   # coverage-weighted composite
    img = img + rng.normal(0, rng.uniform(4, 12), size=img.shape).astype(np.float32)
    image = np.clip(np.round(img), 0, 255).astype(np.uint8)

    mask = (alpha >= 0.5).astype(np.uint8)[..., None]
    ys, xs = np.nonzero(mask[..., 0])
    bbox = np.array([ys.min(), xs.min(), ys.max() + 1, xs.max() + 1], np.float32) / size
    return image, mask, bbox


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """Per-example generator from (seed, split, index): any example can be regenerated alone."""
    return np.random.default_rng([seed, SPLIT_IDS[split], index])


def generate_example(seed: int, split: str, index: int, size: int
                     ) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """(label, image, mask, bbox) of example ``index`` of ``split``; labels cycle the classes
    so every split is exactly balanced (TFDS shuffles the stored order)."""
    rng = example_rng(seed, split, index)
    label = index % len(CLASS_NAMES)
    return (label, *render_example(rng, label, size))


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    image.save(buf, format="PNG", compress_level=1)   # noisy pixels: higher levels gain ~nothing
    return buf.getvalue()


# ----------------------------------------------------------------------------- TFDS builder

@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
    """Image side in pixels, examples per split, and the seed every example is derived from."""

    image_size: int = 64
    num_train: int = 10_000
    num_test: int = 2_000
    seed: int = 0


class SaitjaxShapes(tfds.core.GeneratorBasedBuilder):
    """One filled shape per image over a cluttered background, with its pixel mask.

    Exists for the token-pruning demo and tests: only the object's patches matter, and the mask
    tells which they are. Procedurally generated from ``config.seed``: no download, no network.
    """

    name = "saitjax_shapes"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {
        "1.0.0": "First release: 8 shape classes, cluttered gradient background, object mask "
                 "and bbox; configs `default` (64 px, 10000/2000) and `tiny` (32 px, 512/128).",
    }
    BUILDER_CONFIGS = [
        ShapesConfig(name="default", description="64x64 px, 10000 train / 2000 test.",
                     image_size=64, num_train=10_000, num_test=2_000, seed=0),
        ShapesConfig(name="tiny", description="32x32 px, 512 train / 128 test (unit tests).",
                     image_size=32, num_train=512, num_test=128, seed=0),
    ]
    DEFAULT_CONFIG_NAME = "default"

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
                "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
                "mask": tfds.features.Image(shape=(size, size, 1), encoding_format="png",
                                            doc="1 on object pixels, 0 elsewhere."),
                "bbox": tfds.features.BBoxFeature(doc="Object box, normalised (ymin, xmin, "
                                                      "ymax, xmax)."),
            }),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        del dl_manager  # nothing to download
        cfg = self.builder_config
        return {"train": self._generate_examples("train", cfg.num_train),
                "test": self._generate_examples("test", cfg.num_test)}

    def _generate_examples(self, split: str, num: int) -> Iterator[tuple[int, dict]]:
        cfg = self.builder_config
        for index in range(num):
            label, image, mask, bbox = generate_example(cfg.seed, split, index, cfg.image_size)
            yield index, {"image": _png(image), "label": label, "mask": _png(mask),
                          "bbox": tfds.features.BBox(*(float(v) for v in bbox))}


def build_shapes_dataset(data_dir: str | os.PathLike | None = None, config: str = "default"
                         ) -> tfds.core.DatasetBuilder:
    """The ``saitjax_shapes/<config>`` builder, generated into ``data_dir`` on first use only.

    Idempotent: prepared data is never regenerated or overwritten. No network access. Processes
    that start together on a fresh machine (a sweep, the hosts of a job on one shared disk) take
    turns through a lock file next to the data, so one generates and the others then read;
    without it the second one to finish failed with TFDS's "Destination ... already exists".
    """
    configs = [c.name for c in SaitjaxShapes.BUILDER_CONFIGS]
    if config not in configs:
        raise ValueError(f"unknown saitjax_shapes config {config!r}; available: {configs}")
    data_dir = os.path.expanduser(os.fspath(data_dir)) if data_dir else None  # "": default
    if data_dir is not None:
        os.makedirs(data_dir, exist_ok=True)
    builder = tfds.builder(f"saitjax_shapes/{config}", data_dir=data_dir)
    if builder.is_prepared():
        return builder
    with _generation_lock(os.fspath(builder.data_dir_root), config):
        builder = tfds.builder(f"saitjax_shapes/{config}", data_dir=data_dir)  # look again
        if not builder.is_prepared():
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(
                    download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
    return builder


@contextlib.contextmanager
def _generation_lock(root: str, config: str) -> Iterator[None]:
    """An exclusive ``flock`` on ``<root>/saitjax_shapes.<config>.lock`` (local directories; a
    remote ``gs://`` root, or a system without ``fcntl``, is generated unguarded)."""
    try:
        import fcntl
    except ImportError:  # Windows
        fcntl = None
    if "://" in root or fcntl is None:
        yield
        return
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, f"saitjax_shapes.{config}.lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed, or the process dies
        yield
