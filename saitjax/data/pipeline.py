"""tf.data input pipelines (per-host shards, exact evaluation) and host -> global jax batches.

Why: every host reads only its own shard of a TFDS split (``tfds.split_for_jax_process``),
preprocesses it on its CPUs and hands its local batch to ``jax.make_array_from_process_local_data``,
which assembles one global array sharded over the mesh axis ``"data"``. Evaluation is exact: the
tail is padded with ``valid=False`` examples instead of dropped, and every host yields the same
number of batches so multi-host evaluation cannot deadlock on a collective.

    ds = make_dataset("saitjax_shapes", "train", train=True, image_size=64,
                      per_host_batch_size=128, data_dir="/tmp/tfds", crop_scale=(0.35, 1))
    for batch in global_batches(ds, data_sharding(mesh)):
        ...  # {"image": [B, 64, 64, 3] f32, "label": [B] i32, "valid": [B] bool}

``name`` is a TFDS name (``"saitjax_shapes/tiny"``, ``"imagenet2012"``, ``"cifar10"``) or
``"imagefolder:/path/to/root"`` for a JPEG tree ``root/<split>/<class>/<image>.jpg``.
"""

from __future__ import annotations

import collections
import difflib
import math
import os
import re
from typing import Any, Iterable, Iterator, Sequence

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from saitjax import parallel
from saitjax.data import preprocess as pp
from saitjax.data import shapes_builder  # registers the generated `saitjax_shapes` builder

pp.hide_gpus_from_tf()

GENERATED = {"saitjax_shapes": shapes_builder.build_shapes_dataset}
IMAGEFOLDER_PREFIX = "imagefolder:"
# Archives TFDS expects in manual_dir (one split per archive; at least one must be there).
_MANUAL_FILES = {"imagenet2012": ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")}
_DOC = "docs/imagenet.md"


# ----------------------------------------------------------------------------- opening sources

class _Source:
    """A TFDS builder or an ImageFolder, with per-host reading and exact shard sizes."""

    def __init__(self, builder: Any, imagefolder: bool):
        self.builder = builder
        self.imagefolder = imagefolder
        image = builder.info.features["image"]
        self.jpeg = not imagefolder and getattr(image, "encoding_format", None) == "jpeg"

    def _check_split(self, split: str) -> None:
        names = re.sub(r"\[.*?\]", "", split).split("+")
        known = list(self.builder.info.splits.keys())
        for n in names:
            if n.strip() not in known:
                raise ValueError(f"split {n.strip()!r} (from {split!r}) does not exist in "
                                 f"{self.builder.name}; available splits: {known}")
        if self.imagefolder and split not in known:
            raise ValueError(f"ImageFolder supports whole splits only ({known}), got {split!r}")

    def shard_sizes(self, split: str, process_count: int) -> list[int]:
        self._check_split(split)
        if self.imagefolder:
            n = self.builder.info.splits[split].num_examples
            return [len(range(i, n, process_count)) for i in range(process_count)]
        return [self.builder.info.splits[tfds.split_for_jax_process(
            split, process_index=i, process_count=process_count)].num_examples
            for i in range(process_count)]

    def read(self, split: str, process_index: int, process_count: int, *, shuffle: bool,
             seed: int, skip_image_decoding: bool) -> tf.data.Dataset:
        self._check_split(split)
        if self.imagefolder:
            ds = self.builder.as_dataset(split=split, shuffle_files=False)
            return ds.shard(process_count, process_index)
        host_split = tfds.split_for_jax_process(split, process_index=process_index,
                                                process_count=process_count)
        decoders = {"image": tfds.decode.SkipDecoding()} if skip_image_decoding else None
        read_config = tfds.ReadConfig(shuffle_seed=seed)
        return self.builder.as_dataset(split=host_split, shuffle_files=shuffle,
                                       decoders=decoders, read_config=read_config)


def _unknown_name_error(name: str, base: str, known: Sequence[str]) -> ValueError:
    close = difflib.get_close_matches(base, known, n=5, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ValueError(
        f"Unknown dataset {name!r}: {base!r} is not a registered TFDS builder.{hint} Check the "
        f"spelling (`tfds.list_builders()` lists the {len(known)} known names), write a config "
        f"as 'name/config' (e.g. 'saitjax_shapes/tiny'), or use "
        f"'{IMAGEFOLDER_PREFIX}/path/to/root' for a JPEG tree root/<split>/<class>/<image>.jpg.")


def _prepare(builder: Any, base: str, name: str, data_dir: str | None,
             manual_dir: str | None, download: bool) -> None:
    """Prepares a missing dataset when that needs no network (manual data), else explains."""
    root = os.fspath(builder.data_dir_root)
    if getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
        manual = manual_dir or os.path.join(root, "downloads", "manual")
        files = _MANUAL_FILES.get(base, ())
        if not os.path.isdir(manual):
            problem = "does not exist"
        else:
            missing = [f for f in files if not os.path.exists(os.path.join(manual, f))]
            # TFDS builds the splits whose archives exist; with none there is nothing to build.
            problem = f"lacks {', '.join(missing)}" if files and len(missing) == len(files) else ""
        if problem:
            what = (", ".join(files) if files
                    else "the files named in the dataset's manual download instructions")
            raise FileNotFoundError(
                f"{name!r} is not prepared in data_dir {root!r} and its manual_dir {manual!r} "
                f"{problem}. Download {what} by hand, place them in manual_dir and run again: "
                f"the first run builds the TFRecords (see {_DOC}).\n"
                f"{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}")
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual))
    elif download:
        builder.download_and_prepare()
    else:
        raise FileNotFoundError(
            f"{name!r} is not prepared in data_dir {root!r}. Prepare it with "
            f"`tfds build {name} --data_dir={root}` (needs network), "
            f"pass download=True, or point data_dir at the directory that holds it.")


def open_dataset(name: str, *, data_dir: str | None = None, manual_dir: str | None = None,
                 download: bool = False) -> _Source:
    """Resolves ``name`` to a prepared source, preparing it when that needs no network.

    ``data_dir``/``manual_dir`` of None or "" mean the TFDS defaults ($TFDS_DATA_DIR or
    ~/tensorflow_datasets, and <data_dir>/downloads/manual). Raises ValueError for an unknown
    name or config and FileNotFoundError for a missing directory or missing manual-download
    files; prepared data is never overwritten.
    """
    data_dir = os.path.expanduser(os.fspath(data_dir)) if data_dir else None   # "" = default
    manual_dir = os.path.expanduser(os.fspath(manual_dir)) if manual_dir else None
    if name.startswith(IMAGEFOLDER_PREFIX):
        root = os.path.expanduser(name[len(IMAGEFOLDER_PREFIX):])
        if not os.path.isdir(root):
            raise FileNotFoundError(
                f"ImageFolder root {root!r} does not exist; expected a directory laid out as "
                f"root/<split>/<class>/<image>.jpg (e.g. root/train/cat/001.jpg).")
        builder = tfds.folder_dataset.ImageFolder(root)
        if not builder.info.splits.keys():
            raise FileNotFoundError(f"ImageFolder root {root!r} holds no images; expected "
                                    f"root/<split>/<class>/<image>.jpg")
        return _Source(builder, imagefolder=True)

    base = name.split("/")[0]
    known = tfds.list_builders(with_community_datasets=False)
    if base not in known:
        raise _unknown_name_error(name, base, known)
    if base in GENERATED:
        config = name.split("/")[1] if "/" in name else "default"
        try:
            return _Source(GENERATED[base](data_dir, config), imagefolder=False)
        except ValueError as e:  # unknown config
            raise ValueError(f"Cannot open {name!r}: {e}") from e
    if data_dir is not None and not os.path.isdir(data_dir):
        raise FileNotFoundError(
            f"data_dir {data_dir!r} does not exist; it should be the TFDS data directory that "
            f"holds prepared datasets (<data_dir>/{base}/<config>/<version>/...). Fix the path "
            f"or create it and prepare {name!r} there.")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # unknown config or version: tfds lists what exists
        raise ValueError(f"Cannot open {name!r}: {e}") from e
    if not builder.is_prepared():
        _prepare(builder, base, name, data_dir, manual_dir, download)
    return _Source(builder, imagefolder=False)


def dataset_info(name: str, *, data_dir: str | None = None, manual_dir: str | None = None,
                 download: bool = False) -> dict:
    """{"num_classes", "class_names", "splits": {split: num_examples}} of a dataset."""
    source = open_dataset(name, data_dir=data_dir, manual_dir=manual_dir, download=download)
    label = source.builder.info.features["label"]
    return {"num_classes": label.num_classes, "class_names": list(label.names),
            "splits": {k: v.num_examples for k, v in source.builder.info.splits.items()}}


def _host_args(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ValueError(f"process_index {index} not in [0, {count})")
    return index, count


def num_eval_batches(name: str, split: str, per_host_batch_size: int, *,
                     data_dir: str | None = None, manual_dir: str | None = None,
                     process_count: int | None = None, download: bool = False) -> int:
    """Batches every host yields in exact evaluation: ceil(largest host shard / batch)."""
    _, count = _host_args(0, process_count)
    source = open_dataset(name, data_dir=data_dir, manual_dir=manual_dir, download=download)
    return math.ceil(max(source.shard_sizes(split, count)) / per_host_batch_size)


# ----------------------------------------------------------------------------- pipelines

def _train_stream(source: _Source, split: str, index: int, count: int, *, host_seed: int,
                  cache: bool, shuffle_buffer: int, num_epochs: int | None,
                  start_example: int) -> tf.data.Dataset:
    """(example index, {"image", "label"}) pairs: every epoch reshuffled, resumable.

    Uncached, each epoch is the host shard in file order shuffled with a seed of its own, so a
    resume starts at its epoch and skips less than one epoch of records (TFDS file shuffling
    is not used: it cannot be re-seeded per epoch). Cached (small data), the cached shard is
    reshuffled each repeat and a resume replays the cached stream, which is cheap.
    """
    if start_example < 0:
        raise ValueError(f"start_step must be >= 0, got {start_example}")
    base = source.read(split, index, count, shuffle=False, seed=host_seed,
                       skip_image_decoding=source.jpeg)
    base = base.map(lambda ex: {"image": ex["image"], "label": ex["label"]})
    if cache:
        ds = base.cache().shuffle(shuffle_buffer, seed=host_seed, reshuffle_each_iteration=True)
        return ds.repeat(num_epochs).enumerate().skip(start_example)
    n = source.shard_sizes(split, count)[index]
    first_epoch, offset = divmod(start_example, n)
    last_epoch = np.iinfo(np.int64).max if num_epochs is None else num_epochs

    def epoch(e: tf.Tensor) -> tf.data.Dataset:
        seed_e = tf.constant(host_seed, tf.int64) + e * 1_000_003
        return base.shuffle(shuffle_buffer, seed=seed_e,
                            reshuffle_each_iteration=False).enumerate(start=e * n)

    return tf.data.Dataset.range(first_epoch, last_epoch).flat_map(epoch).skip(offset)


def make_dataset(name: str, split: str, *, train: bool, image_size: int,
                 per_host_batch_size: int, data_dir: str | None = None,
                 manual_dir: str | None = None,
                 crop_scale: Sequence[float] = (0.08, 1.0),
                 crop_ratio: Sequence[float] = (3 / 4, 4 / 3), hflip: bool = True,
                 randaugment: str | None = None, crop_pct: float = 0.875,
                 mean: Sequence[float] = pp.IMAGENET_MEAN, std: Sequence[float] = pp.IMAGENET_STD,
                 interpolation: str = "bicubic", shuffle_buffer: int = 10_000, seed: int = 0,
                 keep_mask: bool = False, num_epochs: int | None = None,
                 process_index: int | None = None, process_count: int | None = None,
                 download: bool = False, cache: bool = False,
                 num_parallel_calls: int = tf.data.AUTOTUNE,
                 prefetch: int = 2, start_step: int = 0) -> tf.data.Dataset:
    """Per-host batches {"image" f32 [b,S,S,3], "label" i32 [b], "valid" bool [b], "mask"?}.

    Train: host shard -> per-epoch shuffle -> epochs (``num_epochs`` counted from step 0;
    None = forever) -> DeiT augmentation (stateless, seeded per (seed, host, example index))
    -> batch(drop_remainder=True). The stream is a pure function of ``seed``: a run resumed
    with ``start_step`` continues exactly where an uninterrupted one would be.
    Eval: one exact pass; the tail is padded with ``valid=False`` examples and every host
    yields ``num_eval_batches(...)`` batches (the dataset's cardinality). ``keep_mask`` adds
    "mask" uint8 [b,S,S] through the eval geometry (ignored for train).
    """
    index, count = _host_args(process_index, process_count)
    if per_host_batch_size <= 0:
        raise ValueError(f"per_host_batch_size must be positive, got {per_host_batch_size}")
    source = open_dataset(name, data_dir=data_dir, manual_dir=manual_dir, download=download)
    features = source.builder.info.features
    if keep_mask and "mask" not in features:
        raise ValueError(f"keep_mask=True but {name!r} has no 'mask' feature "
                         f"(only the generated 'saitjax_shapes' has one)")
    host_seed = int(np.random.SeedSequence([seed, index]).generate_state(1)[0])

    if train:
        ds = _train_stream(source, split, index, count, host_seed=host_seed, cache=cache,
                           shuffle_buffer=shuffle_buffer, num_epochs=num_epochs,
                           start_example=start_step * per_host_batch_size)
        base_seed = tf.constant([seed, index], tf.int64)

        def train_map(i: tf.Tensor, ex: dict) -> dict:
            s = tf.random.experimental.stateless_fold_in(base_seed, i)
            image = pp.train_preprocess(
                ex["image"], s, image_size=image_size, crop_scale=crop_scale,
                crop_ratio=crop_ratio, hflip=hflip, randaugment=randaugment, mean=mean, std=std,
                interpolation=interpolation)
            return {"image": tf.ensure_shape(image, [image_size, image_size, 3]),
                    "label": tf.cast(ex["label"], tf.int32), "valid": tf.constant(True)}

        ds = ds.map(train_map, num_parallel_calls=num_parallel_calls)
        ds = ds.batch(per_host_batch_size, drop_remainder=True)
        return ds.prefetch(prefetch)

    sizes = source.shard_sizes(split, count)
    num_batches = math.ceil(max(sizes) / per_host_batch_size)
    ds = source.read(split, index, count, shuffle=False, seed=host_seed,
                     skip_image_decoding=False)

    def eval_map(ex: dict) -> dict:
        mask = ex["mask"] if keep_mask else None
        out = pp.eval_preprocess(ex["image"], image_size=image_size, crop_pct=crop_pct,
                                 mean=mean, std=std, interpolation=interpolation, mask=mask)
        image, mask = out if keep_mask else (out, None)
        item = {"image": tf.ensure_shape(image, [image_size, image_size, 3]),
                "label": tf.cast(ex["label"], tf.int32), "valid": tf.constant(True)}
        if keep_mask:
            item["mask"] = tf.ensure_shape(mask, [image_size, image_size])
        return item

    ds = ds.map(eval_map, num_parallel_calls=num_parallel_calls)
    if cache:
        ds = ds.cache()
    blank = tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), ds.element_spec)
    num_pad = num_batches * per_host_batch_size - sizes[index]
    ds = ds.concatenate(tf.data.Dataset.from_tensors(blank).repeat(num_pad))
    ds = ds.batch(per_host_batch_size, drop_remainder=True)
    ds = ds.apply(tf.data.experimental.assert_cardinality(num_batches))
    return ds.prefetch(prefetch)


# ----------------------------------------------------------------------------- host -> global

def data_sharding(mesh: jax.sharding.Mesh, axis: str = "data") -> jax.sharding.NamedSharding:
    """Leading (batch) axis split over the mesh axis ``axis``; other axes replicated."""
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis))


def to_global_batch(batch: Any, mesh_or_sharding: jax.sharding.Mesh | jax.sharding.Sharding
                    ) -> Any:
    """Host-local numpy/tf batch (pytree) -> global jax arrays sharded on the batch axis.

    Each process passes its own rows; the global batch is their concatenation in process order.
    """
    sharding = (mesh_or_sharding if isinstance(mesh_or_sharding, jax.sharding.Sharding)
                else data_sharding(mesh_or_sharding))
    return parallel.to_global(batch, sharding)


def prefetch_to_device(iterator: Iterable[Any], size: int = 2) -> Iterator[Any]:
    """Keeps ``size`` batches already transferred (transfers are async) ahead of the consumer."""
    queue: collections.deque = collections.deque()
    for item in iterator:
        queue.append(item)
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


def global_batches(ds: tf.data.Dataset,
                   mesh_or_sharding: jax.sharding.Mesh | jax.sharding.Sharding,
                   prefetch: int = 2) -> Iterator[Any]:
    """Iterates a per-host tf.data dataset as global jax batches, ``prefetch`` ahead."""
    batches = (to_global_batch(b, mesh_or_sharding) for b in tfds.as_numpy(ds))
    return prefetch_to_device(batches, prefetch) if prefetch > 0 else batches
