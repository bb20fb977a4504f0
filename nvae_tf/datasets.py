"""The datasets of NVAE (Vahdat & Kautz, 2020): one table of their facts.

`DATASETS` maps each dataset name to a `Dataset`: the stored image shape,
whether the images are binary, how the pipeline reads it (TFDS builder and
splits, crops, flips), and, for MNIST-like data, the padding to the
network's 32x32. `NVAEConfig` (the architecture) and `nvae_tf.data` (the
input pipeline) both read this table. The pixel constants of 8-bit images
live here too. Nothing here imports TensorFlow.
"""

from __future__ import annotations

import dataclasses

MAX_PIXEL = 255  # largest 8-bit value; pixels in [0, 1] are value / 255.
SOURCE_BITS = 8  # bit depth of every stored dataset.
MNIST_SIDE = 28  # MNIST-like images are stored 28x28 ...
MNIST_PAD = 2  # ... and zero-padded by two pixels per side to 32 (official).

DEFAULT_DATASET = "mnist"  # the official `--dataset` default.
IMAGE_FOLDER = "image_folder"  # user images: sizes come from the config.


@dataclasses.dataclass(frozen=True)
class Dataset:
    """How one named dataset is stored and read.

    Attributes:
      image_shape: [H, W, C] of the stored images the pipeline yields.
      tfds_name: TFDS builder (with config), or None for non-TFDS sources.
      train_split / eval_split: TFDS split names.
      random_flip: official default for horizontal flips of training images.
      binary: modelled as binary images (dynamic binarisation, Bernoulli
        likelihood), as the official code does for MNIST and Omniglot.
      geometry: `none` (stored at `image_shape`), `square` (variable size:
        crop a square, resize), `celeba` (official crop box, resize) or
        `omniglot` (grayscale, invert, resize).
      random_crop: square crops at a random offset on the training set.
      unsupported: why the input pipeline cannot read it (None: it can).
    """

    image_shape: tuple[int, int, int]
    tfds_name: str | None = None
    train_split: str = "train"
    eval_split: str = "test"
    random_flip: bool = False
    binary: bool = False
    geometry: str = "none"
    random_crop: bool = False
    unsupported: str | None = None

    @property
    def pads_28_to_32(self) -> bool:
        """MNIST-like data: the network sees them padded to 32x32."""
        return self.image_shape[:2] == (MNIST_SIDE, MNIST_SIDE)

    @property
    def network_size(self) -> int:
        """Side length fed to the network (after the MNIST padding)."""
        side = self.image_shape[0]
        return side + 2 * MNIST_PAD if self.pads_28_to_32 else side

    @property
    def channels(self) -> int:
        return self.image_shape[2]


def _rgb(size: int, tfds_name: str, eval_split: str = "validation",
         geometry: str = "square", random_crop: bool = False) -> Dataset:
    return Dataset((size, size, 3), tfds_name, eval_split=eval_split,
                   random_flip=True, geometry=geometry, random_crop=random_crop)


_MNIST_SHAPE = (MNIST_SIDE, MNIST_SIDE, 1)
DATASETS: dict[str, Dataset] = {
    "fashion_mnist": Dataset(_MNIST_SHAPE),  # the embedded default data
    "mnist": Dataset(_MNIST_SHAPE, "mnist", binary=True),
    "omniglot": Dataset(_MNIST_SHAPE, "omniglot", binary=True,
                        geometry="omniglot"),
    "cifar10": _rgb(32, "cifar10", "test", "none"),
    "celeba_64": _rgb(64, "celeb_a", geometry="celeba"),
    "celeba_256": Dataset((256, 256, 3), "celeb_a_hq/256", "train[:90%]",
                          "train[90%:]", random_flip=True),
    "imagenet_32": _rgb(32, "downsampled_imagenet/32x32"),
    "imagenet_64": _rgb(64, "downsampled_imagenet/64x64"),
    "ffhq": Dataset(
        (256, 256, 3), random_flip=True,
        unsupported="TFDS has no FFHQ builder. Put the images (PNG) in a "
        "folder and use dataset='image_folder', data_dir=FOLDER, "
        "image_size=256, image_channels=3, random_flip=True (the official "
        "setting)."),
    "lsun_bedroom_128": _rgb(128, "lsun/bedroom", random_crop=True),
    "lsun_bedroom_256": _rgb(256, "lsun/bedroom", random_crop=True),
    "lsun_church_64": _rgb(64, "lsun/church_outdoor", random_crop=True),
    "lsun_church_128": _rgb(128, "lsun/church_outdoor", random_crop=True),
    "lsun_tower_64": _rgb(64, "lsun/tower", random_crop=True),
    "lsun_tower_128": _rgb(128, "lsun/tower", random_crop=True),
}
NAMES = tuple(DATASETS) + (IMAGE_FOLDER,)  # every accepted `dataset` value
