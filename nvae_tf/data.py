"""Input pipelines of NVAE (Vahdat & Kautz, 2020): datasets and preprocessing.

`make_datasets(DataConfig(...))` returns a training and an evaluation
`tf.data.Dataset` of float32 image batches `[B, H, W, C]` in [0, 1] (labels
dropped) and a `DataInfo`. The evaluation split is the test split, or the
validation split (`eval_split="validation"`) carved out of the training
split by `validation_fraction` (see "Validation split" below). Images come at their stored shape (28x28 for
MNIST-like data; the model pads 28 -> 32 itself). Preprocessing follows the
official data loaders and `pre_process` and runs on whole batches:

1. value / 255;
2. random horizontal flip, training set only, for the natural-image datasets
   (cifar10, celeba, imagenet, lsun), none for MNIST-like data;
3. dynamic binarisation of binary datasets (mnist, omniglot): every pixel
   becomes Bernoulli(intensity), redrawn at every pass over the data and, as
   in the official code, on the evaluation set too;
4. bit reduction to `num_x_bits`:
   x = floor(255 x / 2^(8 - bits)) / (2^bits - 1).

Randomness is stateless: shuffling, flips and binarisation are seeded from
the `seed` of `make_datasets`, and a per-batch seed stream
(`tf.data.Dataset.random` with `rerandomize_each_iteration=True`) changes
at every pass, so a rebuilt pipeline with the same seed (and the same TF global seed, which
`keras.utils.set_random_seed` sets) yields the same batches, epoch by epoch.

Sources:
- `fashion_mnist`, the embedded default: the gzipped IDX files of the Debian
  package `dataset-fashion-mnist`, parsed with numpy.
- Official datasets through TFDS, never downloading (`download=False`):
  `mnist`, `cifar10`, `celeba_64` (`celeb_a`, official 148x148 crop, eval on
  the validation split), `celeba_256` (`celeb_a_hq/256`, last 10% as eval:
  GLOW's 27,000/3,000 sizes, not its membership), `imagenet_32`/`imagenet_64`
  (`downsampled_imagenet`), `lsun_*` (`lsun`, random square crop on train),
  `omniglot` (TFDS's 105x105 background/evaluation split, made grayscale,
  inverted to white strokes on black and resized to 28; the official code
  uses the IWAE 28x28 split, so numbers are not comparable to the paper).
  `ffhq` has no TFDS builder: use `image_folder`.
- `image_folder`: PNG/JPEG files under `data_dir` (recursive), converted to
  `image_channels`, centre-cropped to a square and resized to `image_size`.
  Files are sorted by relative path; every 10th (indices 0, 10, 20, ...) is
  the test set, the rest the training set.

Validation split: with `validation_fraction` f > 0, V = round(f N) of the N
training examples are held out of training, the same ones for every seed,
so that model choices (tuning, early stopping) never look at the test split.
None of the datasets above has a validation split of its own besides the
one already used as its evaluation split, so it is always carved:
- Fashion-MNIST and image folders: spread evenly over the stored order
  (of the training files, for a folder): example i is a validation example
  when floor((i + 1) V / N) > floor(i V / N), which picks exactly V;
- TFDS: the last V examples of the training split, read with TFDS split
  slicing (only those records are read).
With f = 0 (the default) the training split is the whole one, unchanged.

Undecodable image files (truncated, corrupt, not images) never stop a run
midway. `image_check='scan'` (the default) decodes every file when the
datasets are built and raises `DataError` naming each bad file, before any
training step; a folder is scanned once per process. `image_check='skip'`
does not scan: a file that fails to decode is left out of its pass with a
warning on stderr naming it (`skipped_image_files()` lists them all); this
decoding costs more per file (each file is its own small dataset, so that
a failure keeps its name; docs/performance.md). Either way the training
split is refilled from the next shuffled pass, so that every pass has
`DataInfo.steps_per_epoch` batches even if a file breaks while training.
"""

from __future__ import annotations

import atexit
import dataclasses
import gzip
import hashlib
import os
import re
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import tensorflow as tf
from absl import logging

from nvae_tf import cli

from nvae_tf import datasets
from nvae_tf.config import ConfigError
from nvae_tf.datasets import MAX_PIXEL, MNIST_SIDE, SOURCE_BITS

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_TRAIN_FILE = "train-images-idx3-ubyte.gz"
FASHION_MNIST_EVAL_FILE = "t10k-images-idx3-ubyte.gz"
FASHION_MNIST_APT = "apt-get install -y dataset-fashion-mnist"
IDX_IMAGES_MAGIC = 0x803  # IDX: unsigned bytes (0x08), 3 dimensions (0x03).
IDX_HEADER_BYTES = 16  # magic, count, rows, cols as big-endian uint32.

# Official CelebA-64 face crop of the 178x218 aligned images, then resize.
CELEBA_CROP_LEFT, CELEBA_CROP_TOP = 15, 40
CELEBA_CROP_RIGHT, CELEBA_CROP_BOTTOM = 163, 188

IMAGE_FOLDER_EVAL_EVERY = 10  # every 10th sorted file is a test image.
IMAGE_FOLDER_EXTENSIONS = (".png", ".jpg", ".jpeg")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
# How undecodable image-folder files are handled (module docstring).
IMAGE_CHECKS = ("scan", "skip")
SCAN_BATCH = 1024  # paths per batch handed back by the scan
MAX_NAMED_FILES = 10  # bad files named in one error message
# Files decoded at once by the skip-checking decoder (each one its own tiny
# dataset, so that a failure can be tied to its path).
DECODE_CYCLE = 16

AUTOTUNE = tf.data.AUTOTUNE
TEST_SPLIT, VALIDATION_SPLIT = "test", "validation"
EVAL_SPLITS = (TEST_SPLIT, VALIDATION_SPLIT)
# A TFDS training split that validation can be carved from: a split name,
# optionally with a prefix slice (`train[:90%]`).
_TFDS_PREFIX_SPLIT = re.compile(r"^(\w+)(\[:[^\]]*\])?$")


class DataError(cli.UserError, ValueError):
    """The data cannot be used as they are (corrupt, too few, unreadable);
    the message names the file or setting and what to do."""


# DataConfig fields an `NVAEConfig` implies (`DataConfig.from_model_config`).
MODEL_IMPLIED_FIELDS = ("dataset", "image_size", "image_channels",
                        "num_x_bits", "binary")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What to read and how to preprocess it.

    The dataset's own facts (stored size, TFDS builder, official flips) come
    from `nvae_tf.datasets.DATASETS`; the seed of shuffling and augmentation
    is an argument of `make_datasets` (the run's seed, or one per pass).

    Attributes:
      dataset: a name in `nvae_tf.datasets.NAMES`.
      data_dir: folder of the data: the IDX files (fashion_mnist), the TFDS
        data directory (None: TFDS's default) or the image folder.
      batch_size: GLOBAL batch, images per step over all replicas and
        workers (official `--batch_size` is per GPU: multiply it by the
        number of GPUs).
      image_size: side length of `image_folder` images; other datasets have
        a fixed stored size (None or that size).
      image_channels: 1 or 3 for `image_folder` (converted on decoding).
      shuffle_buffer: examples in the training shuffle buffer (an image
        folder's file list is always shuffled whole).
      num_x_bits: bit depth of the pixels the model sees (1..8).
      binary: dynamic binarisation; None: the dataset's official default
        (mnist, omniglot).
      random_flip: horizontal flips of training images; None: the dataset's
        official default (on for natural images, off for MNIST-like data and
        image folders).
      image_check: `scan` (decode every image-folder file before use and
        fail naming the undecodable ones) or `skip` (leave them out with a
        warning while reading); see the module docstring.
      validation_fraction: share in [0, 1) of the training split held out
        as the validation split (module docstring); 0: no validation split.
    """

    dataset: str
    data_dir: str | None = None
    batch_size: int = 32
    image_size: int | None = None
    image_channels: int | None = None
    shuffle_buffer: int = 10000
    num_x_bits: int = SOURCE_BITS
    binary: bool | None = None
    random_flip: bool | None = None
    image_check: str = "scan"
    validation_fraction: float = 0.0

    def __post_init__(self):
        if isinstance(self.data_dir, os.PathLike):
            object.__setattr__(self, "data_dir", os.fspath(self.data_dir))

        def fail(field, expected):
            raise ConfigError.invalid(field, getattr(self, field), expected)

        def is_int(value):
            return isinstance(value, int) and not isinstance(value, bool)

        if self.dataset not in datasets.NAMES:
            fail("dataset", f"one of {', '.join(datasets.NAMES)}")
        source = datasets.DATASETS.get(self.dataset)
        if source is not None and source.unsupported:
            raise ConfigError("dataset", source.unsupported)
        if self.data_dir is not None and not isinstance(self.data_dir, str):
            fail("data_dir", "a path or None")
        for name, low in (("batch_size", 1), ("shuffle_buffer", 1)):
            if not is_int(getattr(self, name)) or getattr(self, name) < low:
                fail(name, f"an integer >= {low}")
        if not is_int(self.num_x_bits) or not 1 <= self.num_x_bits <= 8:
            fail("num_x_bits", "an integer in [1, 8]")
        for name in ("binary", "random_flip"):
            if getattr(self, name) not in (None, True, False):
                fail(name, "True, False or None")
        if self.image_size is not None and (
                not is_int(self.image_size) or self.image_size < 1):
            fail("image_size", "a positive integer or None")
        if self.image_channels not in (None, 1, 3):
            fail("image_channels", "1, 3 or None")
        if self.image_check not in IMAGE_CHECKS:
            fail("image_check", f"one of {', '.join(IMAGE_CHECKS)}")
        fraction = self.validation_fraction
        if isinstance(fraction, bool) or not isinstance(
                fraction, (int, float)) or not 0 <= fraction < 1:
            fail("validation_fraction", "a number in [0, 1)")
        if source is None:  # image_folder (data_dir: checked when opened)
            for name in ("image_size", "image_channels"):
                if getattr(self, name) is None:
                    fail(name, "image_size and image_channels for "
                               "image_folder")
            return
        stored_size, _, stored_channels = source.image_shape
        for name, stored in (("image_size", stored_size),
                             ("image_channels", stored_channels)):
            if getattr(self, name) not in (None, stored):
                fail(name, f"None: {self.dataset} is stored with "
                           f"{name}={stored} ({name} is for image_folder)")

    @classmethod
    def from_model_config(cls, model_config: Any, **values) -> DataConfig:
        """The data an `NVAEConfig` implies (dataset, sizes, bits, binary),
        with the pipeline's own settings (`batch_size`, `data_dir`, ...) from
        `values`."""
        folder = model_config.dataset == datasets.IMAGE_FOLDER
        implied = dict(
            dataset=model_config.dataset,
            image_size=model_config.data_size if folder else None,
            image_channels=(model_config.image_channels_resolved
                            if folder else None),
            num_x_bits=model_config.num_x_bits,
            binary=model_config.is_binary)
        return cls(**{**values, **implied})

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """[H, W, C] of the yielded images."""
        if self.dataset == datasets.IMAGE_FOLDER:
            return (self.image_size, self.image_size, self.image_channels)
        return datasets.DATASETS[self.dataset].image_shape

    @property
    def is_binary(self) -> bool:
        if self.binary is not None:
            return self.binary
        source = datasets.DATASETS.get(self.dataset)
        return source is not None and source.binary

    @property
    def random_flip_resolved(self) -> bool:
        if self.random_flip is not None:
            return self.random_flip
        source = datasets.DATASETS.get(self.dataset)
        return source is not None and source.random_flip


@dataclasses.dataclass(frozen=True)
class DataInfo:
    """Sizes of the splits.

    Attributes:
      num_train: examples in the training split (without the validation
        examples).
      num_eval: examples in the test split.
      image_shape: [H, W, C] of the yielded images.
      steps_per_epoch: full training batches per pass, num_train // batch.
      num_validation: examples in the validation split (0: none).
    """

    num_train: int
    num_eval: int
    image_shape: tuple[int, int, int]
    steps_per_epoch: int
    num_validation: int = 0


# --------------------------------------------------------------- preprocessing
def _levels_to_unit(levels: tf.Tensor, num_bits: int) -> tf.Tensor:
    """8-bit levels (float32, integral, 0..255) -> [0, 1] at `num_bits`."""
    if num_bits == SOURCE_BITS:
        return levels / MAX_PIXEL
    bin_width = 2.0 ** (SOURCE_BITS - num_bits)  # a power of 2: exact.
    return tf.floor(levels / bin_width) / (2 ** num_bits - 1)


def quantize(x: tf.Tensor, num_bits: int) -> tf.Tensor:
    """Reduces pixels to `num_bits` bits (official `pre_process`).

    x = floor(255 x / 2^(8 - bits)) / (2^bits - 1); 5 bits maps the 8-bit
    value v to floor(v / 8) / 31. 255 x is rounded first (x is taken to be on
    the 8-bit grid v / 255), so float error never moves a value across a bin
    edge. Idempotent; identity at 8 bits.

    Args:
      x: float tensor in [0, 1], any shape.
      num_bits: target bit depth, 1..8.

    Returns:
      A tensor of x's shape and dtype on the grid k / (2^bits - 1).
    """
    if not isinstance(num_bits, int) or not 1 <= num_bits <= SOURCE_BITS:
        raise ValueError(f"`num_bits` must be an integer in [1, 8]. "
                         f"Received: num_bits={num_bits!r}")
    x = tf.convert_to_tensor(x)
    if num_bits == SOURCE_BITS:
        return x
    levels = tf.round(tf.cast(x, tf.float32) * MAX_PIXEL)
    return tf.cast(_levels_to_unit(levels, num_bits), x.dtype)


def _preprocess(images: tf.Tensor, seed: tf.Tensor, *, num_x_bits: int,
                binary: bool, random_flip: bool) -> tf.Tensor:
    """uint8 [B, H, W, C] -> float32 [B, H, W, C] in [0, 1] (module doc)."""
    flip_seed, binary_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 2))
    levels = tf.cast(images, tf.float32)  # [B, H, W, C], 0..255
    if random_flip:
        batch = tf.shape(levels)[0]
        flip = tf.random.stateless_uniform([batch, 1, 1, 1], flip_seed) < 0.5
        levels = tf.where(flip, tf.reverse(levels, axis=[2]), levels)
    if binary:
        # Bernoulli(intensity). Bit reduction keeps 0 and 1 unchanged.
        noise = tf.random.stateless_uniform(tf.shape(levels), binary_seed)
        return tf.cast(noise < levels / MAX_PIXEL, tf.float32)
    return _levels_to_unit(levels, num_x_bits)


def _resize_uint8(images: tf.Tensor, size: int) -> tf.Tensor:
    """[B, H, W, C] -> uint8 [B, size, size, C], bilinear with antialiasing
    (close to PIL's bilinear resize), rounded back to 8 bits as PIL does."""
    resized = tf.image.resize(images, [size, size], method="bilinear",
                              antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0, MAX_PIXEL),
                   tf.uint8)


def _crop_square_and_resize(image: tf.Tensor, size: int,
                            offset: tf.Tensor) -> tf.Tensor:
    """Largest square of `image` [H, W, C] at relative `offset` [2] in
    [0, 1] (0.5: centre), resized to [size, size, C] uint8."""
    shape = tf.shape(image)
    side = tf.minimum(shape[0], shape[1])
    slack = tf.cast(shape[:2] - side, tf.float32)
    top_left = tf.cast(tf.round(slack * offset), tf.int32)
    square = tf.slice(image, tf.concat([top_left, [0]], 0), [side, side, -1])
    return _resize_uint8(square[None], size)[0]


def _celeba_crop(images: tf.Tensor) -> tf.Tensor:
    """Official CelebA-64 geometry: 148x148 face box -> 64x64."""
    box = images[:, CELEBA_CROP_TOP:CELEBA_CROP_BOTTOM,
                 CELEBA_CROP_LEFT:CELEBA_CROP_RIGHT, :]
    return _resize_uint8(box, datasets.DATASETS["celeba_64"].image_shape[0])


def _omniglot_strokes(images: tf.Tensor) -> tf.Tensor:
    """TFDS Omniglot (black strokes on white RGB, 105x105) -> white strokes
    on black, 28x28x1, the polarity of the official (IWAE) data."""
    gray = tf.image.rgb_to_grayscale(images)
    return _resize_uint8(MAX_PIXEL - tf.cast(gray, tf.float32), MNIST_SIDE)


_BATCH_GEOMETRY = {"celeba": _celeba_crop, "omniglot": _omniglot_strokes}


# --------------------------------------------------------------------- sources
def _read_idx_images(path: str) -> np.ndarray:
    """Parses a gzipped IDX image file -> uint8 [N, 28, 28, 1]."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(
            f"{path} is not a readable gzip file ({e}); it is probably "
            "corrupt: reinstall or re-download it.") from e
    if len(raw) < IDX_HEADER_BYTES:
        raise DataError(f"{path} is truncated: {len(raw)} bytes, shorter "
                         "than the 16-byte IDX header.")
    magic, count, rows, cols = np.frombuffer(
        raw[:IDX_HEADER_BYTES], dtype=">u4").tolist()
    if magic != IDX_IMAGES_MAGIC:
        raise DataError(f"{path} is not an IDX image file: magic number "
                         f"{magic:#x}, expected {IDX_IMAGES_MAGIC:#x}.")
    if (rows, cols) != (MNIST_SIDE, MNIST_SIDE):
        raise DataError(f"{path} holds {rows}x{cols} images, expected "
                         f"{MNIST_SIDE}x{MNIST_SIDE}.")
    expected = IDX_HEADER_BYTES + count * rows * cols
    if len(raw) != expected:
        raise DataError(f"{path} is corrupt: {len(raw)} bytes, but its header "
                         f"({count} images of {rows}x{cols}) needs {expected}.")
    pixels = np.frombuffer(raw, dtype=np.uint8, offset=IDX_HEADER_BYTES)
    return pixels.reshape(count, rows, cols, 1)


def load_fashion_mnist(
        data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Reads Fashion-MNIST images (no labels) from the gzipped IDX files.

    Args:
      data_dir: folder holding `train-images-idx3-ubyte.gz` and
        `t10k-images-idx3-ubyte.gz`; None: `FASHION_MNIST_DIR`.

    Returns:
      (train, test) uint8 arrays [60000, 28, 28, 1] and [10000, 28, 28, 1].

    Raises:
      FileNotFoundError: a file is missing.
      DataError: a file is corrupt.
    """
    folder = FASHION_MNIST_DIR if data_dir is None else os.fspath(data_dir)
    paths = [os.path.join(folder, name)
             for name in (FASHION_MNIST_TRAIN_FILE, FASHION_MNIST_EVAL_FILE)]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found: missing {', '.join(missing)}. Install "
            f"it with `{FASHION_MNIST_APT}` (files go to {FASHION_MNIST_DIR}) "
            "or pass --data_dir with a folder holding "
            f"{FASHION_MNIST_TRAIN_FILE} and {FASHION_MNIST_EVAL_FILE}.")
    train, test = (_read_idx_images(p) for p in paths)
    return train, test


class _Split(NamedTuple):
    """One split before batching: `items` and the per-example function that
    turns an item (and a seed [2]) into a uint8 image (None: items are), or
    `decode_files(paths, training)`, a dataset transform from file paths to
    uint8 images that may drop files (endless when training: the pipeline
    takes one pass worth of batches)."""

    items: tf.data.Dataset
    num_examples: int
    to_image: Callable[[Any, tf.Tensor], tf.Tensor] | None = None
    decode_files: Callable[[tf.data.Dataset, bool],
                           tf.data.Dataset] | None = None


def _tfds_missing_message(dataset: str, name: str, data_dir: str | None):
    where = data_dir or (
        "the TFDS default (~/tensorflow_datasets or $TFDS_DATA_DIR)")
    return (f"Dataset {dataset!r} (TFDS {name!r}) is not prepared in {where}, "
            "and this pipeline never downloads. On a machine with network run "
            f"`tfds build {name} --data_dir DIR` (some datasets, e.g. "
            "celeb_a_hq, need a manual download first; see the TFDS "
            "catalog), copy DIR here and pass --data_dir DIR.")


def _tfds_split(config: DataConfig, split: str, training: bool,
                file_seed: int) -> _Split:
    import tensorflow_datasets as tfds  # only the TFDS sources need it.

    source = datasets.DATASETS[config.dataset]
    try:
        ds, info = tfds.load(
            source.tfds_name, split=split, data_dir=config.data_dir,
            download=False, with_info=True, shuffle_files=training,
            read_config=tfds.ReadConfig(
                shuffle_seed=file_seed,
                shuffle_reshuffle_each_iteration=True))
    except AssertionError as e:  # TFDS: "could not find data in ..."
        raise FileNotFoundError(_tfds_missing_message(
            config.dataset, source.tfds_name, config.data_dir)) from e
    try:  # `info.splits` is empty for unprepared data and under mock_data.
        num_examples = int(info.splits[split].num_examples)
    except KeyError:
        num_examples = int(ds.cardinality())
        if num_examples < 0:
            num_examples = int(ds.reduce(0, lambda count, _: count + 1))
    images = ds.map(lambda example: example["image"],
                    num_parallel_calls=AUTOTUNE)
    to_image = None
    if source.geometry == "square":
        size = source.image_shape[0]

        def to_image(image, seed):
            if training and source.random_crop:
                offset = tf.random.stateless_uniform([2], seed)
            else:
                offset = tf.constant([0.5, 0.5])
            return _crop_square_and_resize(image, size, offset)
    return _Split(images, num_examples, to_image)


def list_image_files(folder: str) -> list[str]:
    """Sorted paths of the PNG/JPEG files under `folder` (recursive; hidden
    files and folders skipped). Their contents are checked when decoded.

    Raises:
      FileNotFoundError: `folder` is not a directory.
      DataError: no image files.
    """
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"image_folder: data_dir {folder!r} is not an existing directory.")
    relative = []
    for parent, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        relative += [
            os.path.relpath(os.path.join(parent, name), folder)
            for name in files if not name.startswith(".")
            and name.lower().endswith(IMAGE_FOLDER_EXTENSIONS)]
    if not relative:
        raise DataError(f"image_folder: no {'/'.join(IMAGE_FOLDER_EXTENSIONS)}"
                        f" files found under {folder!r}; point --data_dir "
                        "(DataConfig.data_dir) at the folder of images.")
    return [os.path.join(folder, name) for name in sorted(relative)]


def _decode(path: tf.Tensor, channels: int) -> tf.Tensor:
    """Image file -> uint8 [H, W, channels]; fails on an undecodable file."""
    return tf.io.decode_image(tf.io.read_file(path), channels=channels,
                              dtype=tf.uint8, expand_animations=False)


def _why_undecodable(path: str) -> str:
    """A short reason for a file that failed to decode (read again here:
    only the few bad files get here)."""
    try:
        with open(path, "rb") as f:
            header = f.read(len(PNG_SIGNATURE))
    except OSError as err:
        return f"unreadable: {err.strerror}"
    if not header.startswith((PNG_SIGNATURE, JPEG_SIGNATURE)):
        return "not a PNG or JPEG image"
    return "truncated or corrupt"


def find_undecodable_images(paths: list[str], channels: int = 3) -> list[str]:
    """The files of `paths` that cannot be read and decoded, in order.

    Every file is decoded in parallel by tf.data; a failing file is dropped
    by `ignore_errors`, so the undecodable files are those missing from the
    output.
    """
    def decode(path):
        return path, tf.shape(_decode(path, channels))[0]

    readable = set()
    ds = tf.data.Dataset.from_tensor_slices(paths).map(
        decode, num_parallel_calls=AUTOTUNE, deterministic=False)
    for batch, _ in ds.ignore_errors().batch(SCAN_BATCH).as_numpy_iterator():
        readable.update(batch.tolist())
    return [p for p in paths if os.fsencode(p) not in readable]


_SCANNED: set[str] = set()  # digests of the path lists scanned clean


def _scan_image_folder(folder: str, paths: list[str], channels: int) -> None:
    """Decodes every file once per process; raises `DataError` naming the
    undecodable ones."""
    digest = hashlib.sha256("\n".join(paths).encode()).hexdigest()
    if digest in _SCANNED:
        return
    start = time.time()
    bad = find_undecodable_images(paths, channels)
    seconds = time.time() - start
    logging.info("image_folder: decoded all %d files under %s in %.1f s "
                 "(%.0f files/s).", len(paths), folder, seconds,
                 len(paths) / max(seconds, 1e-9))
    if bad:
        named = ", ".join(f"{p} ({_why_undecodable(p)})"
                          for p in bad[:MAX_NAMED_FILES])
        more = (f" and {len(bad) - MAX_NAMED_FILES} more"
                if len(bad) > MAX_NAMED_FILES else "")
        raise DataError(
            f"image_folder: {len(bad)} of {len(paths)} files under {folder} "
            f"cannot be decoded: {named}{more}. Remove or fix them, or pass "
            "--image_check=skip (DataConfig.image_check='skip') to train "
            "without them.")
    _SCANNED.add(digest)


_skip_log_path: str | None = None


def _skip_log() -> str:
    """This process's file of skipped paths, one a line (removed at exit)."""
    global _skip_log_path
    if _skip_log_path is None:
        fd, _skip_log_path = tempfile.mkstemp(prefix="nvae_tf_skipped_",
                                              suffix=".txt")
        os.close(fd)
        atexit.register(lambda path=_skip_log_path: os.path.exists(path)
                        and os.remove(path))
    return _skip_log_path


def skipped_image_files() -> list[str]:
    """Sorted distinct image-folder files this process has skipped because
    they could not be decoded (each was also named in a warning)."""
    if _skip_log_path is None or not os.path.exists(_skip_log_path):
        return []
    with open(_skip_log_path, encoding="utf-8", errors="replace") as f:
        return sorted({line.rstrip("\n") for line in f if line.strip()})


def _decode_or_skip(paths: tf.data.Dataset, to_image, placeholder: tf.Tensor
                    ) -> tf.data.Dataset:
    """Paths -> images; a file that fails is dropped with a warning naming it.

    Each file is decoded in its own one-element dataset whose errors are
    ignored, followed by a `placeholder` marked invalid: the first element
    is the image if it decoded, else the placeholder. Input order is kept.
    """
    def decode_one(path):
        decoded = tf.data.Dataset.from_tensors(path).map(
            lambda p: (to_image(p), True)).ignore_errors()
        failed = tf.data.Dataset.from_tensors((placeholder, False))
        return decoded.concatenate(failed).take(1).map(
            lambda image, ok: (path, image, ok))

    log = "file://" + _skip_log()

    def keep(path, image, ok):
        del image

        def warn():
            line = tf.strings.join(["WARNING: image_folder: skipped ", path,
                                    ": it cannot be decoded (truncated, "
                                    "corrupt or not an image); remove or "
                                    "fix it."])
            with tf.control_dependencies([
                    tf.print(line, output_stream=sys.stderr),
                    tf.print(path, output_stream=log)]):
                return tf.constant(False)

        return tf.cond(ok, lambda: tf.constant(True), warn)

    return paths.interleave(
        decode_one, cycle_length=DECODE_CYCLE, num_parallel_calls=AUTOTUNE,
        deterministic=True).filter(keep).map(lambda path, image, ok: image)


def _image_folder_split(config: DataConfig, paths: list[str]) -> _Split:
    size, channels = config.image_size, config.image_channels

    def to_image(path):
        return _crop_square_and_resize(_decode(path, channels), size,
                                       tf.constant([0.5, 0.5]))

    placeholder = tf.zeros([size, size, channels], tf.uint8)

    def decode(items, training):
        if config.image_check == "skip":
            images = _decode_or_skip(items, to_image, placeholder)
        else:  # scanned: the faster plain decode; a file broken since the
            # scan is dropped with TensorFlow's warning (without its name).
            images = items.map(to_image, num_parallel_calls=AUTOTUNE
                               ).ignore_errors(log_warning=True)
        if not training:
            return images

        def none_decoded(_):
            check = tf.debugging.Assert(False, [
                f"image_folder: no training image under {config.data_dir} "
                "could be decoded (see the warnings above)."])
            with tf.control_dependencies([check]):
                return tf.identity(placeholder)

        # Refills a pass that lost files from the next one; an endless
        # repeat ends only if no file decodes at all, which then fails.
        return images.repeat().concatenate(
            tf.data.Dataset.from_tensors(0).map(none_decoded))

    return _Split(tf.data.Dataset.from_tensor_slices(paths), len(paths),
                  decode_files=decode)


# -------------------------------------------------------------------- pipeline
class _Seeds(NamedTuple):
    """Independent op seeds derived from the seed of `make_datasets`."""

    shuffle: int
    files: int
    train_examples: int
    eval_examples: int
    train_batches: int
    eval_batches: int

    @classmethod
    def from_seed(cls, seed: int) -> _Seeds:
        state = np.random.SeedSequence(seed).generate_state(len(cls._fields))
        return cls(*(int(s) for s in state))


def _seed_stream(seed: int) -> tf.data.Dataset:
    """int64 [2] stateless seeds, a new sequence at every pass."""
    return tf.data.Dataset.random(
        seed=seed, rerandomize_each_iteration=True).batch(2)


def _batches(split: _Split, config: DataConfig, *, training: bool,
             seeds: _Seeds) -> tf.data.Dataset:
    """Shuffle (train) -> per-example decode -> batch -> preprocess."""
    items = split.items
    if training:
        buffer = (split.num_examples if config.dataset == datasets.IMAGE_FOLDER
                  else config.shuffle_buffer)
        items = items.shuffle(buffer, seed=seeds.shuffle,
                              reshuffle_each_iteration=True)
    if split.to_image is not None:
        stream = seeds.train_examples if training else seeds.eval_examples
        items = tf.data.Dataset.zip((items, _seed_stream(stream))).map(
            split.to_image, num_parallel_calls=AUTOTUNE)
    if split.decode_files is not None:
        items = split.decode_files(items, training)
    batches = items.batch(config.batch_size, drop_remainder=training)
    if split.decode_files is not None and training:
        batches = batches.take(split.num_examples // config.batch_size)

    source = datasets.DATASETS.get(config.dataset)
    geometry = _BATCH_GEOMETRY.get(source.geometry) if source else None
    shape = config.image_shape

    def preprocess(images, seed):
        if geometry is not None:
            images = geometry(images)
        x = _preprocess(images, seed, num_x_bits=config.num_x_bits,
                        binary=config.is_binary,
                        random_flip=training and config.random_flip_resolved)
        return tf.ensure_shape(x, (None, *shape))  # [B, H, W, C]

    stream = seeds.train_batches if training else seeds.eval_batches
    ds = tf.data.Dataset.zip((batches, _seed_stream(stream))).map(
        preprocess, num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE)
    # Multi-worker: every worker builds the same seeded order and keeps its
    # share of the batches (file sharding would miss the seed stream).
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA)
    return ds.with_options(options)


def validation_size(num_examples: int, fraction: float) -> int:
    """V = round(fraction * N), the validation examples carved out of N.

    Raises:
      ConfigError: a fraction > 0 that rounds to no example.
    """
    count = round(fraction * num_examples)
    if fraction and not count:
        raise ConfigError(
            "validation_fraction", f"{fraction} of the {num_examples} "
            "training examples rounds to no validation example; raise it.")
    return count


def validation_mask(num_examples: int, num_validation: int) -> np.ndarray:
    """bool [N]: example i is held out for validation when
    floor((i + 1) V / N) > floor(i V / N): exactly V examples, spread evenly
    over the stored order."""
    index = np.arange(num_examples, dtype=np.int64)
    return ((index + 1) * num_validation // num_examples >
            index * num_validation // num_examples)


def _array_splits(train: np.ndarray, fraction: float):
    """(training, validation) `_Split`s of an in-memory training array."""
    mask = validation_mask(len(train),
                           validation_size(len(train), fraction))
    return (_Split(tf.data.Dataset.from_tensor_slices(train[~mask]),
                   int((~mask).sum())),
            _Split(tf.data.Dataset.from_tensor_slices(train[mask]),
                   int(mask.sum())))


def _tfds_splits(config: DataConfig, seeds: _Seeds):
    """(training, validation, test) `_Split`s of a TFDS dataset (TFDS
    reads lazily: a split costs nothing until iterated)."""
    source = datasets.DATASETS[config.dataset]
    train = _tfds_split(config, source.train_split, True, seeds.files)
    test = _tfds_split(config, source.eval_split, False, seeds.files)
    if not config.validation_fraction:
        return train, _Split(None, 0), test
    match = _TFDS_PREFIX_SPLIT.match(source.train_split)
    if match is None:
        raise ConfigError(
            "validation_fraction", f"{config.dataset}'s training split "
            f"{source.train_split!r} cannot be carved; use 0.")
    # The training split is a prefix of `base`: its first `total` records.
    base, total = match.group(1), train.num_examples
    held_out = validation_size(total, config.validation_fraction)
    kept = total - held_out
    train = _tfds_split(config, f"{base}[:{kept}]", True, seeds.files)
    validation = _tfds_split(config, f"{base}[{kept}:{total}]", False,
                             seeds.files)
    return (train._replace(num_examples=kept),
            validation._replace(num_examples=held_out), test)


def make_datasets(
        config: DataConfig, seed: int = 0, eval_split: str = TEST_SPLIT
) -> tuple[tf.data.Dataset, tf.data.Dataset, DataInfo]:
    """Builds the training and evaluation pipelines.

    Args:
      config: what to read and how.
      seed: seed (>= 0) of shuffling, flips and binarisation.
      eval_split: the evaluation pipeline's split, `test` or `validation`
        (which needs `config.validation_fraction` > 0).

    Returns:
      (train_ds, eval_ds, info). Both yield float32 [B, H, W, C] in [0, 1].
      train_ds is shuffled, drops the last partial batch and is not repeated
      (the caller repeats it); it never holds validation examples. eval_ds
      is in stored order and keeps every example.

    Raises:
      FileNotFoundError: the data are not on this machine.
      DataError: corrupt data (with `image_check='scan'`, any undecodable
        image-folder file).
      ConfigError: fewer training examples than a batch.
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"`seed` must be an integer >= 0. Received: "
                         f"seed={seed!r}")
    if eval_split not in EVAL_SPLITS:
        raise ValueError(f"`eval_split` must be one of {EVAL_SPLITS}. "
                         f"Received: eval_split={eval_split!r}")
    if eval_split == VALIDATION_SPLIT and not config.validation_fraction:
        raise ConfigError("validation_fraction", "0 leaves no validation "
                          "split to evaluate; set a fraction in (0, 1).")
    seeds = _Seeds.from_seed(seed)
    fraction = config.validation_fraction
    if config.dataset == "fashion_mnist":
        train, test = load_fashion_mnist(config.data_dir)
        test_split = _Split(tf.data.Dataset.from_tensor_slices(test),
                            len(test))
        if fraction:
            train_split, validation = _array_splits(train, fraction)
        else:
            train_split = _Split(tf.data.Dataset.from_tensor_slices(train),
                                 len(train))
            validation = _Split(None, 0)
    elif config.dataset == datasets.IMAGE_FOLDER:
        if config.data_dir is None:
            raise ConfigError("data_dir", "None is invalid: expected the "
                              "folder of images for image_folder.")
        paths = list_image_files(config.data_dir)
        if config.image_check == "scan":
            _scan_image_folder(config.data_dir, paths, config.image_channels)
        every = IMAGE_FOLDER_EVAL_EVERY
        train_paths = [p for i, p in enumerate(paths) if i % every]
        mask = validation_mask(len(train_paths), validation_size(
            len(train_paths), fraction))
        train_split = _image_folder_split(
            config, [p for p, held in zip(train_paths, mask) if not held])
        validation = _image_folder_split(
            config, [p for p, held in zip(train_paths, mask) if held])
        test_split = _image_folder_split(config, paths[::every])
    else:
        train_split, validation, test_split = _tfds_splits(config, seeds)
    if train_split.num_examples < config.batch_size:
        raise ConfigError(
            "batch_size", f"{config.batch_size} is too large: "
            f"{config.dataset} has only {train_split.num_examples} training "
            "examples, and incomplete training batches are dropped; use a "
            f"batch size <= {train_split.num_examples}.")
    evaluation = validation if eval_split == VALIDATION_SPLIT else test_split
    info = DataInfo(
        num_train=train_split.num_examples,
        num_eval=test_split.num_examples,
        image_shape=config.image_shape,
        steps_per_epoch=train_split.num_examples // config.batch_size,
        num_validation=validation.num_examples)
    return (_batches(train_split, config, training=True, seeds=seeds),
            _batches(evaluation, config, training=False, seeds=seeds), info)
