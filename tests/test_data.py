"""Tests of nvae_tf.data: sources, preprocessing and determinism."""

import dataclasses
import gzip
import os
import time

import numpy as np
import pytest
import tensorflow as tf

from nvae_tf import config as config_lib
from nvae_tf import data
from nvae_tf import datasets

try:
    import tensorflow_datasets as tfds
except ImportError:  # tensorflow-datasets is optional (fashion_mnist only)
    tfds = None
needs_tfds = pytest.mark.skipif(tfds is None,
                                reason="tensorflow-datasets not installed")
FASHION_AVAILABLE = all(
    os.path.isfile(os.path.join(data.FASHION_MNIST_DIR, name))
    for name in (data.FASHION_MNIST_TRAIN_FILE, data.FASHION_MNIST_EVAL_FILE))
needs_fashion = pytest.mark.skipif(
    not FASHION_AVAILABLE,
    reason=f"Fashion-MNIST not installed in {data.FASHION_MNIST_DIR} "
           "(apt-get install -y dataset-fashion-mnist)")


def _first(ds):
    return next(iter(ds)).numpy()


def _parse_idx_independently(path):
    """First image and image count of a gzipped IDX file, read by hand."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    count = int.from_bytes(raw[4:8], "big")
    first = np.frombuffer(raw[16:16 + 28 * 28], dtype=np.uint8)
    return first, count


def _write_idx(path, images, magic=data.IDX_IMAGES_MAGIC):
    count, rows, cols = images.shape
    header = np.array([magic, count, rows, cols], dtype=">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + images.astype(np.uint8).tobytes())


@pytest.fixture
def small_fashion_dir(tmp_path):
    """A valid IDX pair: 40 train, 16 eval images covering all 256 values."""
    values = np.arange(56 * 28 * 28) % 256
    images = np.random.default_rng(0).permutation(values).reshape(56, 28, 28)
    _write_idx(tmp_path / data.FASHION_MNIST_TRAIN_FILE, images[:40])
    _write_idx(tmp_path / data.FASHION_MNIST_EVAL_FILE, images[40:])
    return tmp_path, images[:40], images[40:]


# ---------------------------------------------------------------- fashion_mnist
@needs_fashion
def test_fashion_mnist_real_files():
    config = data.DataConfig("fashion_mnist", batch_size=128)
    train_ds, eval_ds, info = data.make_datasets(config, seed=1)
    assert info == data.DataInfo(num_train=60000, num_eval=10000,
                                 image_shape=(28, 28, 1),
                                 steps_per_epoch=60000 // 128)
    train_sizes = [int(batch.shape[0]) for batch in train_ds]
    assert train_sizes == [128] * 468  # 96 left over, dropped.
    eval_sizes = [int(batch.shape[0]) for batch in eval_ds]
    assert sum(eval_sizes) == 10000 and eval_sizes[-1] == 10000 % 128

    batch = _first(train_ds)
    assert batch.dtype == np.float32 and batch.shape == (128, 28, 28, 1)
    assert batch.min() == 0.0 and batch.max() == 1.0
    levels = batch * 255
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)
    assert len(np.unique(levels.round())) > 100  # grayscale, not binarised.

    for name, split in ((data.FASHION_MNIST_TRAIN_FILE, 0),
                        (data.FASHION_MNIST_EVAL_FILE, 1)):
        first, count = _parse_idx_independently(
            os.path.join(data.FASHION_MNIST_DIR, name))
        arrays = data.load_fashion_mnist()
        assert len(arrays[split]) == count
        assert int(arrays[split][0].sum()) == int(first.sum())
    # The evaluation set is in file order: its first image is t10k's first.
    eval_first = _first(eval_ds)[0]
    assert round(float(eval_first.sum()) * 255) == int(first.sum())
    np.testing.assert_array_equal(
        np.round(eval_first * 255).astype(np.uint8).ravel(), first)


@needs_fashion
def test_fashion_mnist_deterministic_for_a_seed():
    def first_batch(seed):
        train_ds, _, _ = data.make_datasets(
            data.DataConfig("fashion_mnist", batch_size=16), seed=seed)
        return _first(train_ds)

    np.testing.assert_array_equal(first_batch(3), first_batch(3))
    assert not np.array_equal(first_batch(3), first_batch(4))


def test_small_idx_files_and_epoch_reshuffle(small_fashion_dir):
    folder, train, test = small_fashion_dir
    train_arr, test_arr = data.load_fashion_mnist(folder)
    np.testing.assert_array_equal(train_arr[..., 0], train)
    np.testing.assert_array_equal(test_arr[..., 0], test)

    config = data.DataConfig("fashion_mnist", data_dir=str(folder),
                             batch_size=8)
    train_ds, eval_ds, info = data.make_datasets(config)
    assert (info.num_train, info.num_eval, info.steps_per_epoch) == (40, 16, 5)
    epoch1 = np.concatenate(list(train_ds.as_numpy_iterator()))
    epoch2 = np.concatenate(list(train_ds.as_numpy_iterator()))
    assert not np.array_equal(epoch1, epoch2)  # reshuffled every pass
    # Each epoch is a permutation of the training images.
    for epoch in (epoch1, epoch2):
        np.testing.assert_array_equal(
            np.sort(np.round(epoch * 255).reshape(40, -1), axis=0),
            np.sort(train.reshape(40, -1), axis=0))
    # Workers of a multi-worker run each keep their share of the batches.
    assert train_ds.options().experimental_distribute.auto_shard_policy == (
        tf.data.experimental.AutoShardPolicy.DATA)
    # A rebuilt pipeline replays the same epochs.
    again, _, _ = data.make_datasets(config)
    np.testing.assert_array_equal(
        np.concatenate(list(again.as_numpy_iterator())), epoch1)
    # Evaluation: file order, values / 255, no shuffling.
    evaluated = np.concatenate(list(eval_ds.as_numpy_iterator()))
    np.testing.assert_array_equal(evaluated[..., 0],
                                  (test / 255).astype(np.float32))


def test_fashion_mnist_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError,
                       match="apt-get install -y dataset-fashion-mnist"):
        data.make_datasets(data.DataConfig("fashion_mnist",
                                           data_dir=str(tmp_path / "none")))


@pytest.mark.parametrize("defect, message", [
    ("not_gzip", "not a readable gzip file"),
    ("bad_magic", "magic number 0x801"),
    ("truncated", "corrupt: .* bytes"),
    ("wrong_size", "16x16 images"),
])
def test_corrupt_idx_file(small_fashion_dir, defect, message):
    folder, train, _ = small_fashion_dir
    path = folder / data.FASHION_MNIST_TRAIN_FILE
    if defect == "not_gzip":
        path.write_bytes(b"this is no gzip stream" * 10)
    elif defect == "bad_magic":  # a label file's magic number
        _write_idx(path, train, magic=0x801)
    elif defect == "truncated":
        raw = gzip.decompress(path.read_bytes())
        path.write_bytes(gzip.compress(raw[:-100]))
    else:
        _write_idx(path, train[:, :16, :16])
    with pytest.raises(ValueError, match=message) as error:
        data.load_fashion_mnist(folder)
    assert str(path) in str(error.value)


# --------------------------------------------------------------- preprocessing
def test_quantize_5_bits_all_values():
    values = np.arange(256)
    x = tf.constant(values, tf.float32) / 255.0
    expected = (np.floor(values / 8) / 31).astype(np.float32)
    np.testing.assert_array_equal(data.quantize(x, 5).numpy(), expected)
    # Also on x = v * (1/255), which is off the grid by float error.
    off_grid = tf.constant(values * (1 / 255), tf.float32)
    np.testing.assert_array_equal(data.quantize(off_grid, 5).numpy(),
                                  expected)
    np.testing.assert_array_equal(
        data.quantize(data.quantize(x, 5), 5).numpy(), expected)


def test_quantize_other_depths():
    x = tf.constant(np.arange(256) / 255, tf.float32)
    np.testing.assert_array_equal(data.quantize(x, 1).numpy(),
                                  (np.arange(256) >= 128).astype(np.float32))
    np.testing.assert_array_equal(data.quantize(x, 8).numpy(), x.numpy())
    with pytest.raises(ValueError, match="num_bits=9"):
        data.quantize(x, 9)


def test_pipeline_applies_bit_reduction(small_fashion_dir):
    folder, _, test = small_fashion_dir
    _, eval_ds, _ = data.make_datasets(
        data.DataConfig("fashion_mnist", data_dir=str(folder), batch_size=16,
                        num_x_bits=5))
    np.testing.assert_array_equal(
        _first(eval_ds)[..., 0], (np.floor(test / 8) / 31).astype(np.float32))


def test_dynamic_binarisation(small_fashion_dir):
    folder, _, test = small_fashion_dir
    config = data.DataConfig("fashion_mnist", data_dir=str(folder),
                             batch_size=16, binary=True)
    _, eval_ds, _ = data.make_datasets(config, seed=7)
    passes = 200
    draws = np.stack([_first(eval_ds)[..., 0] for _ in range(passes)])
    assert set(np.unique(draws)) <= {0.0, 1.0}
    assert not np.array_equal(draws[0], draws[1])  # redrawn every pass
    # Each 8-bit value occurs 49 times per pass: ~9800 draws per value.
    frequency = draws.mean(axis=0)
    for value in (0, 1, 64, 128, 200, 254, 255):
        mask = test == value
        assert abs(frequency[mask].mean() - value / 255) < 0.03, value
    assert frequency[test == 0].max() == 0.0
    assert frequency[test == 255].min() == 1.0
    # Deterministic: a rebuilt pipeline draws the same sequence.
    _, again, _ = data.make_datasets(config, seed=7)
    np.testing.assert_array_equal(_first(again)[..., 0], draws[0])
    np.testing.assert_array_equal(_first(again)[..., 0], draws[1])


# ------------------------------------------------------------------------ TFDS


def _raw_tfds_images(name, split):
    return np.stack([example["image"] for example in tfds.as_numpy(
        tfds.load(name, split=split, download=False))])


@needs_tfds
def test_tfds_mnist_mock_is_binarised():
    with tfds.testing.mock_data(num_examples=12):
        train_ds, eval_ds, info = data.make_datasets(
            data.DataConfig(dataset="mnist", batch_size=5))
        train, evaluated = _first(train_ds), list(eval_ds.as_numpy_iterator())
    assert (info.num_train, info.num_eval, info.steps_per_epoch) == (12, 12, 2)
    assert train.shape == (5, 28, 28, 1) and train.dtype == np.float32
    assert [len(batch) for batch in evaluated] == [5, 5, 2]
    for batch in (train, *evaluated):
        assert set(np.unique(batch)) == {0.0, 1.0}


@needs_tfds
def test_tfds_cifar10_mock_flips_only_train():
    config = data.DataConfig(dataset="cifar10", batch_size=32,
                             shuffle_buffer=1)  # keeps the source order
    with tfds.testing.mock_data(num_examples=32):
        train_ds, eval_ds, _ = data.make_datasets(config)
        train, evaluated = _first(train_ds), _first(eval_ds)
        raw_train = _raw_tfds_images("cifar10", "train")
        raw_test = _raw_tfds_images("cifar10", "test")
    assert train.shape == (32, 32, 32, 3) and train.dtype == np.float32
    assert 0.0 <= train.min() and train.max() <= 1.0
    np.testing.assert_array_equal(evaluated, raw_test / np.float32(255))
    train_levels = np.round(train * 255)
    flipped = [np.array_equal(level, raw[:, ::-1])
               for level, raw in zip(train_levels, raw_train, strict=True)]
    kept = [np.array_equal(level, raw)
            for level, raw in zip(train_levels, raw_train, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 4 <= sum(flipped) <= 28  # Binomial(32, 1/2)

    no_flip = data.DataConfig(dataset="cifar10", batch_size=32,
                              shuffle_buffer=1, random_flip=False)
    with tfds.testing.mock_data(num_examples=32):
        train_ds, _, _ = data.make_datasets(no_flip)
        np.testing.assert_array_equal(_first(train_ds),
                                      raw_train / np.float32(255))


@needs_tfds
def test_tfds_celeba_and_omniglot_geometry():
    with tfds.testing.mock_data(num_examples=4):
        _, celeba_ds, _ = data.make_datasets(
            data.DataConfig(dataset="celeba_64", batch_size=4))
        celeba = _first(celeba_ds)
        raw_celeba = _raw_tfds_images("celeb_a", "validation")
        _, omniglot_ds, _ = data.make_datasets(
            data.DataConfig(dataset="omniglot", batch_size=4, binary=False))
        omniglot = _first(omniglot_ds)
        raw_omniglot = _raw_tfds_images("omniglot", "test")
    box = raw_celeba[:, 40:188, 15:163].astype(np.float32)  # 148x148 face
    expected = tf.image.resize(box, [64, 64], antialias=True).numpy()
    assert celeba.shape == (4, 64, 64, 3)
    np.testing.assert_allclose(celeba * 255, np.round(expected), atol=1e-3)
    gray = tf.image.rgb_to_grayscale(raw_omniglot).numpy().astype(np.float32)
    expected = tf.image.resize(255 - gray, [28, 28], antialias=True).numpy()
    assert omniglot.shape == (4, 28, 28, 1)
    np.testing.assert_allclose(omniglot * 255, np.round(expected), atol=1e-3)


@needs_tfds
@pytest.mark.parametrize("dataset, shape", [
    ("imagenet_32", (32, 32, 3)),  # variable-size mock images
    ("lsun_church_64", (64, 64, 3)),
    ("celeba_256", (256, 256, 3)),
])
def test_tfds_mock_shapes(dataset, shape):
    with tfds.testing.mock_data(num_examples=3):
        train_ds, eval_ds, info = data.make_datasets(
            data.DataConfig(dataset=dataset, batch_size=2))
        assert _first(train_ds).shape == (2, *shape)
        assert _first(eval_ds).shape == (2, *shape)
    assert info.image_shape == shape


@needs_tfds
def test_tfds_missing_data_fails_fast(tmp_path):
    start = time.monotonic()
    with pytest.raises(FileNotFoundError) as error:
        data.make_datasets(data.DataConfig(dataset="cifar10",
                                           data_dir=str(tmp_path)))
    assert time.monotonic() - start < 5
    message = str(error.value)
    assert "'cifar10'" in message and "tfds build cifar10" in message
    assert "--data_dir" in message


@needs_tfds
def test_registry_names_tfds_builders():
    for source in datasets.DATASETS.values():
        if source.tfds_name is None:
            continue
        builder_name, _, builder_config = source.tfds_name.partition("/")
        builder = tfds.builder_cls(builder_name)
        if builder_config:
            assert builder_config in [c.name for c in builder.BUILDER_CONFIGS]


# ---------------------------------------------------------------- image folder
def _write_image(path, image):
    path.parent.mkdir(parents=True, exist_ok=True)
    encode = (tf.io.encode_png if path.suffix == ".png"
              else tf.io.encode_jpeg)
    path.write_bytes(encode(image).numpy())


@pytest.fixture
def image_folder(tmp_path):
    """12 images: 2 for evaluation (sorted indices 0 and 10), 10 for training.

    The first is a 20x40 PNG whose 20x20 centre is white and sides black.
    """
    rng = np.random.default_rng(0)
    centre = np.zeros((20, 40, 1), np.uint8)
    centre[:, 10:30] = 255
    _write_image(tmp_path / "00_centre.png", centre)
    sizes = [(30, 40), (50, 20), (32, 32), (64, 48), (17, 23)]
    for i in range(11):
        height, width = sizes[i % len(sizes)]
        channels = 3 if i % 2 else 1
        suffix = (".png", ".jpg", ".jpeg")[i % 3]
        image = rng.integers(0, 256, (height, width, channels), np.uint8)
        _write_image(tmp_path / f"sub{i % 2}" / f"{i:02d}{suffix}", image)
    (tmp_path / "notes.txt").write_text("not an image, ignored")
    return tmp_path


@pytest.mark.parametrize("channels", [1, 3])
def test_image_folder(image_folder, channels):
    config = data.DataConfig(dataset="image_folder",
                             data_dir=str(image_folder), batch_size=4,
                             image_size=8, image_channels=channels)
    train_ds, eval_ds, info = data.make_datasets(config)
    assert info == data.DataInfo(num_train=10, num_eval=2,
                                 image_shape=(8, 8, channels),
                                 steps_per_epoch=2)
    train = list(train_ds.as_numpy_iterator())
    assert [b.shape for b in train] == [(4, 8, 8, channels)] * 2
    assert all(b.dtype == np.float32 and 0 <= b.min() and b.max() <= 1
               for b in train)
    evaluated = _first(eval_ds)
    assert evaluated.shape == (2, 8, 8, channels)
    np.testing.assert_array_equal(evaluated[0], 1.0)  # centre crop only
    if channels == 3:  # a grayscale file gives three equal channels
        np.testing.assert_array_equal(evaluated[0, ..., 0],
                                      evaluated[0, ..., 2])


def test_image_folder_errors(tmp_path, image_folder):
    def make(folder):
        return data.make_datasets(data.DataConfig(
            dataset="image_folder", data_dir=str(folder), batch_size=2,
            image_size=8, image_channels=3))

    with pytest.raises(FileNotFoundError, match="not an existing directory"):
        make(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .png/.jpg/.jpeg files"):
        make(tmp_path / "empty")
    bad = image_folder / "sub1" / "zz_bad.jpg"
    bad.write_bytes(b"GIF89a truncated")
    with pytest.raises(data.DataError,
                       match=r"zz_bad.jpg \(not a PNG or JPEG image\)"):
        make(image_folder)


@pytest.fixture
def folder_with_bad_images(image_folder):
    """`image_folder` plus a truncated PNG and a text file renamed .png:
    14 files, 12 of them decodable; both bad files are training files."""
    good = (image_folder / "00_centre.png").read_bytes()
    (image_folder / "05_truncated.png").write_bytes(good[:len(good) // 2])
    (image_folder / "sub1" / "09_text.png").write_bytes(b"just some text\n")
    return image_folder


def _folder_config(folder, **kwargs):
    return data.DataConfig(dataset="image_folder", data_dir=str(folder),
                           batch_size=4, image_size=8, image_channels=1,
                           **kwargs)


def test_image_folder_scan_names_every_undecodable_file(
        folder_with_bad_images):
    with pytest.raises(data.DataError) as err:
        data.make_datasets(_folder_config(folder_with_bad_images))
    message = str(err.value)
    assert "2 of 14 files" in message
    assert "05_truncated.png (truncated or corrupt)" in message
    assert "09_text.png (not a PNG or JPEG image)" in message
    assert "--image_check=skip" in message
    assert "\n" not in message


def test_image_folder_skip_names_files_and_keeps_the_pass_length(
        folder_with_bad_images, capfd):
    config = _folder_config(folder_with_bad_images, image_check="skip")
    train_ds, eval_ds, info = data.make_datasets(config)
    # 12 training files (10 decodable) make 3 batches of 4 a pass: the
    # third is completed from the next shuffled pass.
    assert (info.num_train, info.num_eval, info.steps_per_epoch) == (12, 2, 3)
    for _ in range(2):
        batches = list(train_ds.as_numpy_iterator())
        assert [b.shape for b in batches] == [(4, 8, 8, 1)] * 3
    assert [b.shape for b in eval_ds.as_numpy_iterator()] == [(2, 8, 8, 1)]
    stderr = capfd.readouterr().err
    for name in ("05_truncated.png", "09_text.png"):
        assert f"WARNING: image_folder: skipped {folder_with_bad_images}" \
            in stderr
        assert name in stderr
    skipped = data.skipped_image_files()
    assert str(folder_with_bad_images / "05_truncated.png") in skipped
    assert str(folder_with_bad_images / "sub1" / "09_text.png") in skipped


def test_image_folder_skip_without_bad_files_is_unchanged(image_folder):
    scanned = data.make_datasets(_folder_config(image_folder))
    skipping = data.make_datasets(_folder_config(image_folder,
                                                 image_check="skip"))
    for a, b in zip(scanned[:2], skipping[:2]):
        for x, y in zip(a.as_numpy_iterator(), b.as_numpy_iterator()):
            np.testing.assert_array_equal(x, y)


def test_image_folder_file_broken_after_the_scan_never_stops_a_pass(
        image_folder):
    config = _folder_config(image_folder)
    data.make_datasets(config)  # scanned clean, once per process
    broken = image_folder / "sub0" / "02.jpeg"  # a training file
    broken.write_bytes(broken.read_bytes()[:40])
    train_ds, _, info = data.make_datasets(config)  # not scanned again
    assert info.steps_per_epoch == 2
    for _ in range(2):
        assert [b.shape for b in train_ds.as_numpy_iterator()] == [
            (4, 8, 8, 1)] * 2


def test_find_undecodable_images(folder_with_bad_images):
    paths = data.list_image_files(str(folder_with_bad_images))
    assert len(paths) == 14
    bad = data.find_undecodable_images(paths)
    assert [os.path.basename(p) for p in bad] == ["05_truncated.png",
                                                  "09_text.png"]


# ---------------------------------------------------------------------- config
@pytest.mark.parametrize("kwargs, field", [
    (dict(dataset="svhn"), "dataset"),
    (dict(dataset="ffhq"), "dataset"),
    (dict(batch_size=0), "batch_size"),
    (dict(shuffle_buffer=0), "shuffle_buffer"),
    (dict(num_x_bits=9), "num_x_bits"),
    (dict(binary="yes"), "binary"),
    (dict(image_check="ignore"), "image_check"),
    (dict(image_channels=2), "image_channels"),
    (dict(dataset="mnist", image_size=32), "image_size"),
    (dict(dataset="image_folder", data_dir="/x", image_channels=3),
     "image_size"),
])
def test_data_config_validation(kwargs, field):
    with pytest.raises(config_lib.ConfigError) as err:
        data.DataConfig(**{"dataset": "fashion_mnist", **kwargs})
    assert err.value.field == field


def test_image_folder_needs_its_folder_when_opened():
    config = data.DataConfig("image_folder", image_size=8, image_channels=3)
    with pytest.raises(config_lib.ConfigError) as err:
        data.make_datasets(config)
    assert err.value.field == "data_dir"


def test_make_datasets_refuses_a_negative_seed(small_fashion_dir):
    folder, _, _ = small_fashion_dir
    with pytest.raises(ValueError, match="seed=-1"):
        data.make_datasets(data.DataConfig("fashion_mnist",
                                           data_dir=str(folder)), seed=-1)


def test_ffhq_points_to_image_folder():
    with pytest.raises(ValueError, match="image_folder"):
        data.DataConfig(dataset="ffhq")


def test_batch_larger_than_training_set(small_fashion_dir):
    folder, _, _ = small_fashion_dir
    with pytest.raises(config_lib.ConfigError,
                       match="batch_size: 64 is too large"):
        data.make_datasets(data.DataConfig("fashion_mnist",
                                           data_dir=str(folder),
                                           batch_size=64))


def test_agrees_with_model_config():
    for name in config_lib.DATASETS:
        if name in ("ffhq", "image_folder"):
            continue
        model = config_lib.NVAEConfig(dataset=name)
        data_config = data.DataConfig.from_model_config(model, batch_size=2)
        assert data_config.image_shape == model.data_shape, name
        assert data_config.is_binary == (name in ("mnist", "omniglot"))
    folder = config_lib.NVAEConfig(dataset="image_folder", image_size=64,
                                   image_channels=3)
    data_config = data.DataConfig.from_model_config(
        folder, batch_size=2, data_dir="/images")
    assert data_config.image_shape == folder.data_shape == (64, 64, 3)


# ------------------------------------------------------------ validation split
def test_validation_mask_picks_exactly_v_spread_evenly():
    mask = data.validation_mask(10, 3)
    np.testing.assert_array_equal(np.flatnonzero(mask), [3, 6, 9])
    for n, v in ((40, 4), (60000, 5000), (37, 1), (7, 7), (5, 0)):
        assert data.validation_mask(n, v).sum() == v
    assert data.validation_size(40, 0.1) == 4
    with pytest.raises(config_lib.ConfigError, match="rounds to no"):
        data.validation_size(40, 0.001)


def _levels(ds):
    """Batches of a non-binary 8-bit pipeline -> uint8 images [N, 28, 28]."""
    return np.concatenate([np.round(b * 255).astype(np.uint8)[..., 0]
                           for b in ds.as_numpy_iterator()])


def test_fashion_mnist_validation_is_carved_from_train(small_fashion_dir):
    folder, train, test = small_fashion_dir
    config = data.DataConfig("fashion_mnist", data_dir=str(folder),
                             batch_size=4, validation_fraction=0.25)
    train_ds, val_ds, info = data.make_datasets(config, seed=3,
                                                eval_split="validation")
    assert (info.num_train, info.num_validation, info.num_eval,
            info.steps_per_epoch) == (30, 10, 16, 7)
    held_out = data.validation_mask(40, 10)
    np.testing.assert_array_equal(_levels(val_ds), train[held_out])
    # The training pipeline never yields a validation image, whatever seed.
    trained = _levels(train_ds)
    assert len(trained) == 28  # 7 full batches of the 30 images
    for image in trained:
        assert any(np.array_equal(image, t) for t in train[~held_out])
    # The same validation images for another seed; test is the test file.
    _, val_other, _ = data.make_datasets(config, seed=11,
                                         eval_split="validation")
    np.testing.assert_array_equal(_levels(val_other), train[held_out])
    _, test_ds, _ = data.make_datasets(config, seed=3)
    np.testing.assert_array_equal(_levels(test_ds), test)


def test_no_validation_fraction_keeps_the_training_split(small_fashion_dir):
    folder, _, _ = small_fashion_dir
    config = data.DataConfig("fashion_mnist", data_dir=str(folder),
                             batch_size=4)
    train_ds, _, info = data.make_datasets(config, seed=5)
    assert (info.num_train, info.num_validation) == (40, 0)
    carved = dataclasses.replace(config, validation_fraction=0.25)
    assert data.make_datasets(carved, seed=5)[2].num_train == 30
    again, _, _ = data.make_datasets(config, seed=5)
    for a, b in zip(train_ds.as_numpy_iterator(), again.as_numpy_iterator()):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(config_lib.ConfigError) as err:
        data.make_datasets(config, eval_split="validation")
    assert err.value.field == "validation_fraction"


def test_image_folder_validation_files(image_folder):
    config = data.DataConfig(dataset="image_folder",
                             data_dir=str(image_folder), batch_size=4,
                             image_size=8, image_channels=1,
                             validation_fraction=0.2)
    train_ds, val_ds, info = data.make_datasets(config,
                                                eval_split="validation")
    # 10 training files, 2 held out (training files 4 and 9), 2 test files.
    assert (info.num_train, info.num_validation, info.num_eval) == (8, 2, 2)
    assert sum(len(b) for b in train_ds.as_numpy_iterator()) == 8
    assert _first(val_ds).shape == (2, 8, 8, 1)


@pytest.mark.parametrize("fraction", [-0.1, 1.0, True, "0.1"])
def test_validation_fraction_is_checked(fraction):
    with pytest.raises(config_lib.ConfigError) as err:
        data.DataConfig("fashion_mnist", validation_fraction=fraction)
    assert err.value.field == "validation_fraction"


@needs_tfds
@pytest.mark.parametrize("dataset, train, held_out", [
    ("cifar10", "train[:9]", "train[9:12]"),
    ("celeba_256", "train[:9]", "train[9:12]")])
def test_tfds_validation_reads_the_tail_of_the_training_split(
        monkeypatch, dataset, train, held_out):
    """TFDS reads the carved splits by slicing (mock data ignore slices, so
    the split names are what is checked)."""
    read = []
    load = tfds.load

    def spy(name, split, **kwargs):
        read.append(split)
        return load(name, split=split, **kwargs)

    monkeypatch.setattr(tfds, "load", spy)
    config = data.DataConfig(dataset=dataset, batch_size=3,
                             validation_fraction=0.25)
    with tfds.testing.mock_data(num_examples=12):
        _, val_ds, info = data.make_datasets(config, eval_split="validation")
        assert _first(val_ds).shape[0] == 3
    assert (info.num_train, info.num_validation) == (9, 3)
    assert {train, held_out} <= set(read)
