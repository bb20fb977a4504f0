"""Image grids and PNG files for samples, reconstructions and interpolations.

Images are NHWC with pixels either float in [0, 1] or uint8 in [0, 255].
A grid is laid out like torchvision's `make_grid` (which the official code
uses for its TensorBoard images): `columns` tiles per row, `padding` pixels
between tiles and around the border, so a grid of R x C tiles of H x W
pixels is `R * (H + padding) + padding` by `C * (W + padding) + padding`.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from nvae_tf.datasets import MAX_PIXEL
from nvae_tf.serving import inference

GRID_PADDING = 2  # pixels between tiles, as torchvision's make_grid
GRID_PAD_VALUE = MAX_PIXEL  # white borders: visible on MNIST's black ground


def to_uint8(images) -> np.ndarray:
    """Float pixels in [0, 1] (clipped) -> uint8 0..255; uint8 passes through.

    Args:
      images: array or tensor of any shape.

    Returns:
      uint8 numpy array of the same shape.
    """
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    if not np.issubdtype(images.dtype, np.floating):
        raise TypeError(f"Expected float images in [0, 1] or uint8, got "
                        f"dtype {images.dtype}.")
    return inference.images_to_uint8(images).numpy()


def grid_layout(num_images: int, columns: int | None = None
                ) -> tuple[int, int]:
    """(rows, columns) of a grid; default columns = ceil(sqrt(num_images))."""
    if num_images < 1:
        raise ValueError(f"num_images={num_images}; expected >= 1.")
    if columns is None or columns <= 0:
        columns = math.ceil(math.sqrt(num_images))
    columns = min(columns, num_images)
    return math.ceil(num_images / columns), columns


def grid_size(num_images: int, image_size: tuple[int, int],
              columns: int | None = None,
              padding: int = GRID_PADDING) -> tuple[int, int]:
    """(height, width) in pixels of `make_grid`'s output."""
    rows, columns = grid_layout(num_images, columns)
    height, width = image_size
    return (rows * (height + padding) + padding,
            columns * (width + padding) + padding)


def make_grid(images, columns: int | None = None,
              padding: int = GRID_PADDING,
              pad_value: int = GRID_PAD_VALUE) -> np.ndarray:
    """Tiles images [N, H, W, C] row by row into one uint8 image.

    Args:
      images: [N, H, W, C], float in [0, 1] or uint8.
      columns: tiles per row; None or 0: ceil(sqrt(N)).
      padding: pixels between tiles and around the border.
      pad_value: uint8 value of the padding.

    Returns:
      uint8 [grid height, grid width, C] (see `grid_size`).
    """
    images = to_uint8(images)
    if images.ndim != 4:
        raise ValueError(f"Expected images [N, H, W, C], got shape "
                         f"{images.shape}.")
    n, height, width, channels = images.shape
    rows, columns = grid_layout(n, columns)
    out_h, out_w = grid_size(n, (height, width), columns, padding)
    grid = np.full((out_h, out_w, channels), pad_value, np.uint8)
    for i in range(n):
        top = padding + (i // columns) * (height + padding)
        left = padding + (i % columns) * (width + padding)
        grid[top:top + height, left:left + width] = images[i]
    return grid


def write_png(path: str, image) -> str:
    """Writes one image [H, W, C] (C = 1 or 3) as PNG; returns `path`.

    Uses `tf.io.gfile`, so `gs://` and other TF file systems work.
    """
    image = to_uint8(image)
    if image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"Expected an image [H, W, 1 or 3], got shape "
                         f"{image.shape}.")
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        tf.io.gfile.makedirs(parent)
    tf.io.write_file(path, tf.io.encode_png(image))
    return path
