"""Llama 3.2 Vision (mllama) preprocessing in numpy, equal to transformers 5.23.

Upstream: `transformers/models/mllama/image_processing_pil_mllama.py` (`MllamaImageProcessorPil`) for the images and
`transformers/models/mllama/processing_mllama.py` (`get_cross_attention_token_mask`,
`convert_sparse_cross_attention_mask_to_dense`) for the cross-attention mask.

Each image is resized, aspect ratio kept, to fit the best canvas of `rows x cols` square tiles (rows * cols <=
max_image_tiles), zero-padded at the bottom and right to the whole canvas, rescaled and normalised in float32, then
cut into row-major tiles:

    uint8 [H, W, 3] ──resize (Pillow filter, uint8)──▶ [h, w, 3] ──pad 0──▶ [rows*T, cols*T, 3]
        ──x*1/255 (float64 → float32), (x - mean) / std (float32)──▶ ──tiles──▶ [rows*cols, 3, T, T]

The padding is normalised too (it becomes -mean/std), as upstream does. Pillow's resampling filters are reproduced
bit for bit (`resize_pil`, on top of `runtime/resize.py`), so `pixel_values` equal transformers' to the
last float32 bit.

`MllamaImagePreprocessor` is the processor's and the pipeline's view of it (`image.ImagePreprocessing`): one image at
a time, as the `vision` graph's feed (pixel_values [1, T, 3, S, S], aspect_ratio_ids [1], aspect_ratio_mask [1, T]),
each tile one cross-attention slot of the decoder. Nothing here imports torch, transformers or Pillow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np

from flamingo_edge.errors import CheckpointError, ImageError, PromptError
from flamingo_edge.runtime.image import (_check_image, read_image_processor_config, settings_problems, to_rgb,
                                         uses_mllama_processor)
from flamingo_edge.runtime.resize import resample_passes, resize_bicubic

__all__ = ["MllamaImageSettings", "MllamaImages", "MllamaImagePreprocessor", "preprocess", "cross_attention_mask",
           "supported_aspect_ratios", "optimal_tiled_canvas", "size_fit_to_canvas", "tile_image", "resize_pil"]

# PIL.Image.Resampling values, as checkpoints store them in "resample"
NEAREST, LANCZOS, BILINEAR, BICUBIC, BOX, HAMMING = 0, 1, 2, 3, 4, 5
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)  # transformers' defaults for MllamaImageProcessor
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)

# ------------------------------------------------------------------------------------------- Pillow filters


def _box(x: float) -> float:
    return 1.0 if -0.5 < x <= 0.5 else 0.0


def _bilinear(x: float) -> float:
    x = abs(x)
    return 1.0 - x if x < 1.0 else 0.0


_HAMMING_A = float(np.float32(0.54))  # Resample.c writes 0.54f + 0.46f * cos(x): float constants, double maths
_HAMMING_B = float(np.float32(0.46))


def _hamming(x: float) -> float:
    x = abs(x)
    if x == 0.0:
        return 1.0
    if x >= 1.0:
        return 0.0
    x = x * math.pi
    return math.sin(x) / x * (_HAMMING_A + _HAMMING_B * math.cos(x))


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x = x * math.pi
    return math.sin(x) / x


def _lanczos(x: float) -> float:
    return _sinc(x) * _sinc(x / 3) if -3.0 <= x < 3.0 else 0.0


# resample -> (Resample.c filter, support); math.sin/cos (libm, as in C) rather than numpy's SIMD versions
_FILTERS: dict[int, tuple[Callable[[float], float], float]] = {
    BOX: (_box, 0.5), BILINEAR: (_bilinear, 1.0), HAMMING: (_hamming, 1.0), LANCZOS: (_lanczos, 3.0)}
_FILTER_NAMES = {LANCZOS: "LANCZOS", BILINEAR: "BILINEAR", BICUBIC: "BICUBIC", BOX: "BOX", HAMMING: "HAMMING"}


@lru_cache(maxsize=64)
def _coefficients(in_size: int, out_size: int, resample: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Resample.c `precompute_coeffs` + `normalize_coeffs_8bpc` for any of Pillow's convolution filters.

    Same as `resize._coefficients` (bicubic only) with the filter as a parameter. Returns (first [out], count [out],
    fixed-point weights int64 [out, K]).
    """
    kernel, support = _FILTERS[resample]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = support * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    first = np.zeros(out_size, dtype=np.int64)
    count = np.zeros(out_size, dtype=np.int64)
    fixed = np.zeros((out_size, ksize), dtype=np.int64)
    for i in range(out_size):  # a few hundred outputs at most per axis: a plain loop keeps C's exact order
        center = (i + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        weights = [kernel((x + xmin - center + 0.5) * (1.0 / filterscale)) for x in range(xmax)]
        total = 0.0
        for w in weights:
            total += w
        if total != 0.0:
            weights = [w / total for w in weights]
        for x, w in enumerate(weights):
            fixed[i, x] = int(-0.5 + w * (1 << 22)) if w < 0 else int(0.5 + w * (1 << 22))  # C's (int) truncates
        first[i], count[i] = xmin, xmax
    return first, count, fixed


def resize_pil(image: np.ndarray, height: int, width: int, resample: int = BILINEAR, *,
               legacy_pass_order: bool = False) -> np.ndarray:
    """Resize a uint8 image exactly like Pillow's `Image.resize((width, height), resample)`.

    Args:
        image: uint8 [H, W, C].
        height: output height.
        width: output width.
        resample: a PIL.Image.Resampling value other than NEAREST (BILINEAR, BICUBIC, BOX, HAMMING, LANCZOS).
        legacy_pass_order: follow Pillow <= 12's pass order (see `resize.resize_bicubic`).

    Returns:
        uint8 [height, width, C].

    Raises:
        CheckpointError: an unsupported filter.
    """
    if resample == BICUBIC:
        return resize_bicubic(image, height, width, legacy_pass_order=legacy_pass_order)
    if resample not in _FILTERS:
        raise CheckpointError(f"resample {resample!r} is not supported; use one of Pillow's convolution filters "
                              f"{ {v: k for k, v in _FILTER_NAMES.items()} }")
    return resample_passes(image, height, width, lambda in_size, out_size: _coefficients(in_size, out_size, resample),
                           legacy_pass_order=legacy_pass_order)


# ------------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class MllamaImageSettings:
    """What `MllamaImageProcessor` does, read from `preprocessor_config.json` (defaults: transformers')."""

    tile_size: int = 224  # "size": {"height": T, "width": T}; one square tile (560 for Llama 3.2 Vision)
    max_image_tiles: int = 4  # tiles per image at most; also the tile axis of pixel_values and the masks
    resample: int = BILINEAR  # PIL.Image.Resampling value
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = IMAGENET_STANDARD_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STANDARD_STD
    do_convert_rgb: bool = True  # grayscale / RGBA → RGB first; off: images must already be RGB

    def __post_init__(self):
        problems = settings_problems(self, {"tile size": self.tile_size, "max_image_tiles": self.max_image_tiles},
                                     ("do_rescale", "do_normalize", "do_convert_rgb"))
        if problems:
            raise CheckpointError("; ".join(problems) + "; fix that value (or re-save the processor with its "
                                  "save_pretrained)")
        if self.resample not in _FILTER_NAMES:
            raise CheckpointError(f"resample {self.resample!r} is not supported; use one of Pillow's convolution "
                                  f"filters { {v: k for k, v in _FILTER_NAMES.items()} } (Llama 3.2 Vision: 2)")

    @property
    def supported_aspect_ratios(self) -> tuple[tuple[int, int], ...]:
        """(rows, cols) tile arrangements; aspect_ratio_ids count from 1 in this order (0 is a padding image)."""
        return supported_aspect_ratios(self.max_image_tiles)

    @classmethod
    def from_processor_config(cls, config: dict[str, Any], *, source: str = "preprocessor_config.json"
                              ) -> MllamaImageSettings:
        """Read the keys `MllamaImageProcessor.save_pretrained` writes; absent keys take transformers' defaults.

        Raises:
            CheckpointError: a non-square or missing tile size, do_resize / do_pad turned off (transformers refuses
                them too), or a value of the wrong type.
        """
        for key in ("do_resize", "do_pad"):
            if config.get(key) is False:
                raise CheckpointError(f"{source}: {key} is false; MllamaImageProcessor only works with it on "
                                      f"(set \"{key}\": true)")
        size = config.get("size", {"height": cls.tile_size, "width": cls.tile_size})
        if not (isinstance(size, dict) and size.get("height") and size.get("height") == size.get("width")):
            raise CheckpointError(f"{source}: size {size!r} is not a square tile; write \"size\": "
                                  "{\"height\": T, \"width\": T} (560 for Llama 3.2 Vision)")
        fields = {key: config[key] for key in ("max_image_tiles", "resample", "do_rescale", "rescale_factor",
                                               "do_normalize", "do_convert_rgb") if config.get(key) is not None}
        try:
            for key in ("image_mean", "image_std"):
                value = config.get(key)
                if value is not None:
                    fields[key] = tuple(float(v) for v in (value if isinstance(value, list) else [value] * 3))
            return cls(tile_size=int(size["height"]), **fields)
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"{source}: cannot read the mllama image settings ({error}); re-save the "
                                  "checkpoint with its processor's save_pretrained") from error
        except CheckpointError as error:
            raise CheckpointError(f"{source}: {error}") from error


# ------------------------------------------------------------------------------------------------- geometry


@lru_cache(maxsize=16)
def supported_aspect_ratios(max_image_tiles: int) -> tuple[tuple[int, int], ...]:
    """Every (rows, cols) with rows * cols <= max_image_tiles, rows outer: upstream's `get_all_supported_aspect_ratios`.

    Upstream names the pair (width, height), but every caller reads it as (height, width) = (rows, cols).
    """
    return tuple((rows, cols) for rows in range(1, max_image_tiles + 1) for cols in range(1, max_image_tiles + 1)
                 if rows * cols <= max_image_tiles)


def optimal_tiled_canvas(height: int, width: int, max_image_tiles: int, tile_size: int) -> tuple[int, int]:
    """The (rows, cols) tiling an image is resized into: upstream's `get_optimal_tiled_canvas`.

    Each arrangement allows the scale min(canvas_h / H, canvas_w / W). The smallest scale >= 1 wins (the least
    upscaling); if every scale is < 1, the largest (the least downscaling); ties go to the smallest canvas area,
    the first one in `supported_aspect_ratios` order on equal areas.
    """
    ratios = supported_aspect_ratios(max_image_tiles)
    scales = [min(rows * tile_size / height, cols * tile_size / width) for rows, cols in ratios]
    upscaling = [s for s in scales if s >= 1]
    selected = min(upscaling) if upscaling else max(scales)
    chosen = [ratio for ratio, s in zip(ratios, scales) if s == selected]
    return min(chosen, key=lambda ratio: ratio[0] * ratio[1])  # min keeps the first of equal areas, as argmin


def size_fit_to_canvas(height: int, width: int, canvas_height: int, canvas_width: int, tile_size: int
                       ) -> tuple[int, int]:
    """(new_height, new_width) of the resized image: upstream's `get_image_size_fit_to_canvas`.

    Each side is first clamped to [tile_size, canvas side]; the side whose clamp scales least is kept and the other
    follows the aspect ratio, floored (at least 1 pixel, at most its clamp).
    """
    target_width = min(max(width, tile_size), canvas_width)
    target_height = min(max(height, tile_size), canvas_height)
    scale_h = target_height / height
    scale_w = target_width / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_height), target_width
    return target_height, min(math.floor(width * scale_h) or 1, target_width)


# --------------------------------------------------------------------------------------------- preprocessing


class MllamaImages(NamedTuple):
    """The image inputs of `MllamaForConditionalGeneration` (B samples, M = most images in a sample, T tiles)."""

    pixel_values: np.ndarray  # float32 [B, M, T, 3, tile, tile]; missing images and tiles are 0
    aspect_ratio_ids: np.ndarray  # int64 [B, M]; 1 + index in supported_aspect_ratios, 0 for a missing image
    aspect_ratio_mask: np.ndarray  # int64 [B, M, T]; 1 for the image's tiles, and always for tile 0 (upstream)
    num_tiles: list[list[int]]  # tiles of each image, for `cross_attention_mask`


def _rgb(image: Any, settings: MllamaImageSettings) -> np.ndarray:
    if settings.do_convert_rgb:
        return to_rgb(image)  # also checks the array
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
            and image.shape[0] and image.shape[1]):
        raise ImageError(f"do_convert_rgb is off, so images must be uint8 RGB [H, W, 3]; got "
                         f"{getattr(image, 'dtype', type(image).__name__)} {getattr(image, 'shape', '')}")
    return image


def tile_image(image: np.ndarray, settings: MllamaImageSettings, *, legacy_pass_order: bool = False
               ) -> tuple[np.ndarray, tuple[int, int]]:
    """One image → its normalised tiles.

    Args:
        image: uint8 [H, W, 3] RGB ([H, W], [H, W, 1] and RGBA too when do_convert_rgb is on; RGBA is composited
            onto white as Pillow does for a PIL RGBA image).

    Returns:
        (float32 [rows * cols, 3, T, T] in row-major tile order, (rows, cols)).
    """
    s, tile = settings, settings.tile_size
    image = _rgb(image, s)
    height, width = image.shape[:2]
    rows, cols = optimal_tiled_canvas(height, width, s.max_image_tiles, tile)
    new_height, new_width = size_fit_to_canvas(height, width, rows * tile, cols * tile, tile)
    canvas = np.zeros((rows * tile, cols * tile, 3), dtype=np.uint8)  # padding before rescale: 0 stays 0
    canvas[:new_height, :new_width] = resize_pil(image, new_height, new_width, s.resample,
                                                 legacy_pass_order=legacy_pass_order)
    pixels = canvas.astype(np.float32)
    if s.do_rescale:
        pixels = (canvas.astype(np.float64) * s.rescale_factor).astype(np.float32)  # transformers' order
    if s.do_normalize:
        pixels = (pixels - np.asarray(s.image_mean, np.float32)) / np.asarray(s.image_std, np.float32)
    tiles = pixels.reshape(rows, tile, cols, tile, 3)  # [rows, T, cols, T, 3]
    tiles = tiles.transpose(0, 2, 4, 1, 3)  # [rows, cols, 3, T, T]
    return np.ascontiguousarray(tiles.reshape(rows * cols, 3, tile, tile)), (rows, cols)


class _ImageSlot(NamedTuple):
    """One image slot of `MllamaImages` (the M axis): what upstream writes for an image, or for a missing one."""

    pixel_values: np.ndarray  # float32 [T, 3, tile, tile]; tiles past the image's own are 0
    aspect_ratio_id: int  # 1 + index in supported_aspect_ratios; 0 for a missing image
    aspect_ratio_mask: np.ndarray  # int64 [T]; the image's tiles, and tile 0 always (a missing image too)
    num_tiles: int  # 0 for a missing image


def _image_slot(image: np.ndarray, settings: MllamaImageSettings, *, legacy_pass_order: bool) -> _ImageSlot:
    """One image's slot, as `MllamaImageProcessorPil` fills it."""
    tiles, (rows, cols) = tile_image(image, settings, legacy_pass_order=legacy_pass_order)
    slot = _padding_slot(settings)
    slot.pixel_values[: rows * cols] = tiles
    slot.aspect_ratio_mask[: rows * cols] = 1
    return slot._replace(aspect_ratio_id=settings.supported_aspect_ratios.index((rows, cols)) + 1,
                         num_tiles=rows * cols)


def _padding_slot(settings: MllamaImageSettings) -> _ImageSlot:
    """The slot of a missing image (a sample with fewer images than the batch's most): zero pixels, aspect ratio id
    0, and tile 0 unmasked, as upstream's `pack_images` / `convert_aspect_ratios_to_ids` / `build_aspect_ratio_mask`
    leave it."""
    tiles, side = settings.max_image_tiles, settings.tile_size
    mask = np.zeros(tiles, dtype=np.int64)
    mask[0] = 1  # upstream sets tile 0 for every slot, padding images included
    return _ImageSlot(np.zeros((tiles, 3, side, side), dtype=np.float32), 0, mask, 0)


def preprocess(images: Sequence[Sequence[np.ndarray]], settings: MllamaImageSettings | None = None, *,
               legacy_pass_order: bool = False) -> MllamaImages:
    """A batch of image lists → the model's image inputs, equal to `MllamaImageProcessorPil(images)`.

    Args:
        images: per sample, its images (uint8 [H, W, 3] RGB; see `tile_image`); samples may hold different counts,
            including none.
        settings: the checkpoint's `MllamaImageSettings` (transformers' defaults if None).
        legacy_pass_order: resize like Pillow <= 12 (see `resize.resize_bicubic`).

    Returns:
        `MllamaImages` (a tuple: pixel_values, aspect_ratio_ids, aspect_ratio_mask, num_tiles).

    Raises:
        ImageError: an image that is not a usable uint8 array.
    """
    s = settings or MllamaImageSettings()
    batch, most = len(images), max((len(sample) for sample in images), default=0)
    padding = _padding_slot(s)
    pixel_values = np.zeros((batch, most, *padding.pixel_values.shape), dtype=np.float32)  # [B, M, T, 3, S, S]
    aspect_ratio_ids = np.zeros((batch, most), dtype=np.int64)  # [B, M]
    aspect_ratio_mask = np.tile(padding.aspect_ratio_mask, (batch, most, 1))  # [B, M, T]
    num_tiles = []
    for b, sample in enumerate(images):
        num_tiles.append([])
        for m, image in enumerate(sample):
            slot = _image_slot(image, s, legacy_pass_order=legacy_pass_order)
            pixel_values[b, m] = slot.pixel_values
            aspect_ratio_ids[b, m] = slot.aspect_ratio_id
            aspect_ratio_mask[b, m] = slot.aspect_ratio_mask
            num_tiles[b].append(slot.num_tiles)
    return MllamaImages(pixel_values, aspect_ratio_ids, aspect_ratio_mask, num_tiles)


class MllamaImagePreprocessor:
    """Llama 3.2 Vision's image preprocessing one image at a time, for the processor and the pipeline
    (`image.ImagePreprocessing`): `preprocess` of a batch equals these slots stacked.

    Every image fills T = `max_image_tiles` cross-attention slots of the decoder, one per tile; the tiles past the
    image's own (`tiles_of`) are zero pixels that the cross-attention mask hides.

    Args:
        settings: what to do; `MllamaImagePreprocessor.from_pretrained(folder)` reads them from a checkpoint.
        legacy_pass_order: resize like Pillow <= 12 rather than Pillow 13 (see `resize.resize_bicubic`); match the
            Pillow that the reference side uses when comparing bit for bit.
    """

    def __init__(self, settings: MllamaImageSettings | None = None, *, legacy_pass_order: bool = False):
        self.settings = settings or MllamaImageSettings()
        self.legacy_pass_order = legacy_pass_order

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, legacy_pass_order: bool = False) -> MllamaImagePreprocessor:
        """Read `processor_config.json` ("image_processor") or `preprocessor_config.json` of a checkpoint or export.

        Raises:
            CheckpointError: neither file holds image settings, or they are not MllamaImageProcessor's (another
                family's settings would be read as transformers' defaults without a word).
        """
        path, config = read_image_processor_config(folder)
        if not uses_mllama_processor(folder):
            raise CheckpointError(f"{path} is not Llama 3.2 Vision's image processor (no \"processor_class\": "
                                  "\"MllamaProcessor\" nor an MllamaImageProcessor \"image_processor_type\"); load "
                                  "it with image.ImagePreprocessor.from_pretrained(folder), or the whole processor "
                                  "with Processor.from_pretrained(folder)")
        return cls(MllamaImageSettings.from_processor_config(config, source=str(path)),
                   legacy_pass_order=legacy_pass_order)

    @property
    def slots_per_image(self) -> int:
        """T: one cross-attention slot per tile, padding tiles included."""
        return self.settings.max_image_tiles

    @property
    def image_shape(self) -> tuple[int, int, int, int]:
        """(T, 3, tile, tile) of one preprocessed image."""
        return self.settings.max_image_tiles, 3, self.settings.tile_size, self.settings.tile_size

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """One image's tiles: float32 [T, 3, tile, tile], zeros past its own tiles (see `vision_feed` for the rest).

        Raises:
            ImageError: an image that is not a usable uint8 array.
        """
        return self.vision_feed(image)["pixel_values"][0]

    def batch(self, images: list[np.ndarray]) -> np.ndarray:
        """Several images' tiles: float32 [N, T, 3, tile, tile]."""
        out = np.zeros((len(images), *self.image_shape), dtype=np.float32)
        for i, image in enumerate(images):
            out[i] = self(image)
        return out

    def vision_feed(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """The `vision` graph's feed for one image, as `MllamaImageProcessorPil` fills the image's slot.

        Returns:
            pixel_values float32 [1, T, 3, tile, tile], aspect_ratio_ids int64 [1], aspect_ratio_mask int64 [1, T].

        Raises:
            ImageError: an image that is not a usable uint8 array.
        """
        return _feed(_image_slot(image, self.settings, legacy_pass_order=self.legacy_pass_order))

    def padding_feed(self) -> dict[str, np.ndarray]:
        """The feed of an image slot a row does not use, as upstream fills it in a batch whose rows hold different
        image counts: zero pixels, aspect_ratio_ids [0], aspect_ratio_mask [[1, 0, ..., 0]]."""
        return _feed(_padding_slot(self.settings))

    def tiles_of(self, image: np.ndarray) -> int:
        """How many tiles the image fills (1..T), from its height and width alone (no resize).

        Raises:
            ImageError: not a usable image array.
        """
        _check_image(image)
        rows, cols = optimal_tiled_canvas(image.shape[0], image.shape[1], self.settings.max_image_tiles,
                                          self.settings.tile_size)
        return rows * cols


def _feed(slot: _ImageSlot) -> dict[str, np.ndarray]:
    """A slot as the `vision` graph's inputs, batch dim 1."""
    return {"pixel_values": slot.pixel_values[None],  # [1, T, 3, S, S]
            "aspect_ratio_ids": np.array([slot.aspect_ratio_id], dtype=np.int64),  # [1]
            "aspect_ratio_mask": slot.aspect_ratio_mask[None]}  # [1, T]


# ----------------------------------------------------------------------------------------- cross-attention


def _image_spans(row: np.ndarray, image_token_id: int) -> list[tuple[int, int]]:
    """[start, end) of the token rows that see each image: upstream's `get_cross_attention_token_mask`.

    Image k is seen from its own `<|image|>` token up to the next `<|image|>`; a run of adjacent image tokens is one
    group, and every image of the group is seen up to the token after the group's next image (or the end).
    """
    locations = np.flatnonzero(row == image_token_id).tolist()
    ends = locations[1:] + [len(row)]
    for k in range(len(locations) - 2, -1, -1):  # from the back, so a run inherits the end past its last image
        if ends[k] == locations[k] + 1:
            ends[k] = ends[k + 1]
    return list(zip(locations, ends))


def cross_attention_mask(input_ids: np.ndarray, num_tiles: Sequence[Sequence[int]], image_token_id: int,
                         max_num_tiles: int) -> np.ndarray:
    """Which image tiles each token attends, equal to `MllamaProcessor`'s `cross_attention_mask`.

    Tokens before a sample's first `<|image|>` (and every token of a sample without images) get all-zero rows;
    padding tokens are rows like any other (right padding sees the last image group, left padding nothing).

    Args:
        input_ids: int64 [B, S], padded.
        num_tiles: per sample, the tiles of each image (`MllamaImages.num_tiles`).
        image_token_id: the id of `<|image|>`.
        max_num_tiles: the settings' `max_image_tiles`.

    Returns:
        int64 [B, S, M, max_num_tiles] with M the most images in a sample.

    Raises:
        PromptError: a sample whose `<|image|>` count differs from its image count.
    """
    input_ids = np.asarray(input_ids)
    batch, length = input_ids.shape
    most = max((len(tiles) for tiles in num_tiles), default=0)
    if len(num_tiles) != batch:
        raise PromptError(f"num_tiles has {len(num_tiles)} samples but input_ids has {batch}; pass the num_tiles "
                          "of the same batch")
    mask = np.zeros((batch, length, most, max_num_tiles), dtype=np.int64)  # [B, S, M, T]
    for b in range(batch):
        spans = _image_spans(input_ids[b], image_token_id)
        if len(spans) != len(num_tiles[b]):
            raise PromptError(f"sample {b} has {len(spans)} image tokens ({image_token_id}) but "
                              f"{len(num_tiles[b])} images; write one <|image|> per image")
        for m, ((start, end), tiles) in enumerate(zip(spans, num_tiles[b])):
            mask[b, start:end, m, :tiles] = 1
    return mask
