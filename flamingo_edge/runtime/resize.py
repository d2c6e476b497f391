"""Pillow's bicubic resize (`src/libImaging/Resample.c`), reimplemented bit for bit in numpy.

transformers' IDEFICS image processor resizes with Pillow on uint8; reproducing it exactly keeps `pixel_values` equal
to transformers' without shipping Pillow to the device: a separable two-pass convolution (in Pillow 13's pass order)
whose a = -0.5 cubic kernel is stretched by the downscale factor (antialiasing), normalised, turned into 22-bit fixed
point, and whose intermediate and final values are rounded and clipped to uint8.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

_PRECISION_BITS = 32 - 8 - 2  # Resample.c: 8 bits of result, 2 bits of headroom for negative lobes / overshoot
_CUBIC_A = -0.5
_CUBIC_SUPPORT = 2.0


# ---------------------------------------------------------------------------------------------------- resampling


def _bicubic_kernel(x: np.ndarray) -> np.ndarray:
    """Resample.c `bicubic_filter`, same operation order so float64 results are identical."""
    x = np.abs(x)
    near = ((_CUBIC_A + 2.0) * x - (_CUBIC_A + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * _CUBIC_A
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _coefficients(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Resample.c `precompute_coeffs` + `normalize_coeffs_8bpc` for the box (0, in_size).

    Returns:
        (first [out], count [out], weights int64 [out, K]): output pixel i reads input pixels
        first[i] .. first[i] + count[i] - 1 with fixed-point weights weights[i, :count[i]] (the rest are 0).
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = _CUBIC_SUPPORT * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size) + 0.5) * scale  # [out]
    first = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)
    count = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - first
    taps = np.arange(ksize)  # [K]
    valid = taps[None, :] < count[:, None]  # [out, K]
    weights = _bicubic_kernel(((taps[None, :] + first[:, None]) - center[:, None] + 0.5) * (1.0 / filterscale))
    weights = np.where(valid, weights, 0.0)
    total = np.zeros(out_size)
    for tap in range(ksize):  # left-to-right sum, as in C (np.sum would reorder and change the last bit)
        total += weights[:, tap]
    weights = np.where(total[:, None] != 0.0, weights / np.where(total == 0.0, 1.0, total)[:, None], weights)
    scaled = weights * (1 << _PRECISION_BITS)
    fixed = np.where(weights < 0, np.trunc(-0.5 + scaled), np.trunc(0.5 + scaled)).astype(np.int64)
    return first, count, fixed


def _convolve_rows(image: np.ndarray, first: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """One 8-bit pass of Resample.c along axis 0 of a uint8 [N, ...] image → uint8 [len(first), ...].

    int32 accumulators as in C (the weights are scaled so that sums never overflow); the tap loop is vectorised
    over output rows, and gathering along axis 0 copies whole contiguous rows.
    """
    image = np.ascontiguousarray(image)
    acc = np.full((len(first), *image.shape[1:]), 1 << (_PRECISION_BITS - 1), dtype=np.int32)
    weights = weights.astype(np.int32).reshape(*weights.shape, *([1] * (image.ndim - 1)))  # [out, K, 1, ...]
    last = image.shape[0] - 1
    for tap in range(weights.shape[1]):
        acc += image[np.minimum(first + tap, last)] * weights[:, tap]  # weights past `count` are 0
    return np.clip(acc >> _PRECISION_BITS, 0, 255).astype(np.uint8)


def _vertical_first(in_height: int, in_width: int, height: int, width: int) -> bool:
    """Pillow >= 13 runs the vertical pass first when the height loses more than twice as many pixels as the width.

    (Resample.c `ImagingResampleInner`, python-pillow/Pillow#9549; Pillow <= 12 always went horizontal first.)
    """
    return in_height - height > 0 and in_height - height > (in_width - width) * 2


def resize_bicubic(image: np.ndarray, height: int, width: int, *, legacy_pass_order: bool = False) -> np.ndarray:
    """Resize a uint8 image exactly like Pillow's `Image.resize((width, height), Resampling.BICUBIC)`.

    Args:
        image: uint8 [H, W, C].
        height: output height.
        width: output width.
        legacy_pass_order: reproduce Pillow <= 12, which always resamples horizontally first; the default follows
            Pillow 13 (see `_vertical_first`). Where the orders differ, it is by a level or two on smooth images
            (up to ~20 on random noise).

    Returns:
        uint8 [height, width, C].
    """
    return resample_passes(image, height, width, _coefficients, legacy_pass_order=legacy_pass_order)


def resample_passes(image: np.ndarray, height: int, width: int,
                    coefficients: Callable[[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]], *,
                    legacy_pass_order: bool = False) -> np.ndarray:
    """Pillow's two 8-bit convolution passes, in its pass order, with the fixed-point weights `coefficients(in_size,
    out_size)` gives per axis ((first, count, weights) as `_coefficients` returns them): the resize of every Pillow
    convolution filter once its kernel is chosen (bicubic here, the others in `runtime/mllama_image.py`).

    Args:
        image: uint8 [H, W, C].
        height, width: the output size.
        coefficients: the filter's `precompute_coeffs` + `normalize_coeffs_8bpc`.
        legacy_pass_order: see `resize_bicubic`.

    Returns:
        uint8 [height, width, C] (a copy when the size is unchanged, as Pillow's resize returns).
    """
    in_height, in_width = image.shape[:2]
    if (in_height, in_width) == (height, width):
        return image.copy()
    first_y, count_y, weights_y = coefficients(in_height, height)
    first_x, _, weights_x = coefficients(in_width, width)
    horizontal = in_width != width
    vertical = in_height != height
    if not legacy_pass_order and _vertical_first(in_height, in_width, height, width):
        if vertical:
            image = _convolve_rows(image, first_y, weights_y)
        if horizontal:
            image = _convolve_rows(image.transpose(1, 0, 2), first_x, weights_x).transpose(1, 0, 2)
        return np.ascontiguousarray(image)
    if horizontal:  # only over the rows that the vertical pass will read, as Pillow does
        row_start, row_stop = first_y[0], first_y[-1] + count_y[-1]
        rows = image[row_start:row_stop].transpose(1, 0, 2)  # [W, rows, C]
        image = _convolve_rows(rows, first_x, weights_x).transpose(1, 0, 2)
        first_y = first_y - row_start
    if vertical:
        image = _convolve_rows(image, first_y, weights_y)
    return np.ascontiguousarray(image)
