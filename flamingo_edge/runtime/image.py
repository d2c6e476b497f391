"""IDEFICS image preprocessing in numpy + OpenCV, equal to transformers' `IdeficsImageProcessorPil`.

transformers resizes with Pillow (`Image.resize(..., BICUBIC)` on uint8); `runtime/resize.py` reproduces that bit
for bit in numpy. The resized uint8 image is then rescaled by 1/255 and normalised with the IDEFICS mean/std exactly
as transformers does (float64 rescale, float32 normalisation), so `pixel_values` agree to the last float32 bit on
x86-64.

Nothing here imports torch, transformers or Pillow.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flamingo_edge.artifacts import read_json
from flamingo_edge.errors import CheckpointError, ImageError
from flamingo_edge.runtime.resize import resize_bicubic

logger = logging.getLogger(__name__)

BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, the value IDEFICS checkpoints store as "resample"
IDEFICS_MEAN = (0.48145466, 0.4578275, 0.40821073)
IDEFICS_STD = (0.26862954, 0.26130258, 0.27577711)

# --------------------------------------------------------------------------------------------- colour handling


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """RGBA → RGB over an opaque white background, as Pillow's `alpha_composite` (AlphaComposite.c) computes it.

    transformers' `convert_to_rgb` does exactly this for a PIL RGBA image. With an opaque white destination the
    C code reduces to: coef1 = a * 128, coef2 = (255 - a) * 128, out = SHIFTFORDIV255(tmp + (128 << 7)) >> 7.
    """
    rgb = rgba[..., :3].astype(np.int64)  # [H, W, 3]
    alpha = rgba[..., 3:].astype(np.int64)  # [H, W, 1]
    tmp = rgb * (alpha << 7) + 255 * ((255 - alpha) << 7) + (0x80 << 7)
    out = ((((tmp >> 8) + tmp) >> 8) >> 7).astype(np.uint8)
    return np.where(alpha == 0, np.uint8(255), out)


def to_rgb(image: np.ndarray) -> np.ndarray:
    """Bring a uint8 image to RGB [H, W, 3], as transformers' `convert_to_rgb` does for the same PIL image.

    Args:
        image: uint8 [H, W] or [H, W, 1] (grayscale), [H, W, 3] (RGB) or [H, W, 4] (RGBA, composited onto white).

    Returns:
        uint8 [H, W, 3].

    Raises:
        ImageError: the array is not uint8 or has an unsupported shape.
    """
    _check_image(image)
    if image.ndim == 2:
        image = image[..., None]
    channels = image.shape[2]
    if channels == 1:
        return np.repeat(image, 3, axis=2)
    if channels == 4:
        return _composite_on_white(image)
    return image


def _check_image(image: Any) -> None:
    if not isinstance(image, np.ndarray):
        raise ImageError(f"expected an image as a numpy array, got {type(image).__name__}; "
                         "load files with flamingo_edge.runtime.image.load_image(path)")
    if image.dtype != np.uint8:
        raise ImageError(f"expected a uint8 image, got dtype {image.dtype}; "
                         "convert it with np.clip(image, 0, 255).astype(np.uint8) (scale [0, 1] floats by 255 first)")
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3, 4))):
        raise ImageError(f"expected an image of shape [H, W], [H, W, 1], [H, W, 3] (RGB) or [H, W, 4] (RGBA), "
                         f"got {image.shape}; channel-first arrays need np.moveaxis(image, 0, -1)")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ImageError(f"the image is empty (shape {image.shape})")


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")  # what a folder of images holds


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file as RGB uint8, like transformers' `load_image` (EXIF orientation applied, alpha dropped).

    Args:
        path: any format OpenCV decodes (PNG, JPEG, BMP, WebP, TIFF, ...).

    Returns:
        uint8 [H, W, 3], RGB.

    Raises:
        ImageError: the file is missing, unreadable or not a decodable image.
    """
    path = Path(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)  # imdecode instead of imread: tells "missing" from "corrupt"
    except OSError as error:
        raise ImageError(f"cannot read image file {path}: {error.strerror or error}; "
                         "check the path and the file's permissions") from error
    import cv2  # only image files need OpenCV; arrays from a camera or a caller do not

    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise ImageError(f"{path} is not an image OpenCV can decode (empty, corrupt or an unsupported format); "
                         "re-save it as PNG or JPEG")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


# -------------------------------------------------------------------------------------------------- preprocessor


@dataclass(frozen=True)
class ImageSettings:
    """The image processor fields of an IDEFICS checkpoint (`processor_config.json` → "image_processor")."""

    height: int = 224  # output size; IDEFICS images are square (`image_size`)
    width: int = 224
    image_mean: tuple[float, ...] = IDEFICS_MEAN
    image_std: tuple[float, ...] = IDEFICS_STD
    rescale_factor: float = 1 / 255
    resample: int = BICUBIC  # only bicubic is implemented
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True

    @classmethod
    def from_dict(cls, config: dict[str, Any], source: str = "image processor config") -> ImageSettings:
        """Read the fields transformers' `IdeficsImageProcessorPil` reads; `image_size` wins over `size`.

        Raises:
            CheckpointError: a size or resampling filter that this runtime does not implement.
        """
        try:
            height, width = _size_from_config(config, source)
            names = ("rescale_factor", "resample", "do_resize", "do_rescale", "do_normalize", "do_convert_rgb")
            fields = {name: config[name] for name in names if config.get(name) is not None}
            for name in ("image_mean", "image_std"):
                if config.get(name) is not None:
                    value = config[name]
                    fields[name] = tuple(float(v) for v in (value if isinstance(value, list) else [value] * 3))
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"{source}: cannot read the image settings ({error}); re-save the checkpoint "
                                  "with IdeficsProcessor.save_pretrained") from error
        settings = cls(height=height, width=width, **fields)
        if settings.do_resize and settings.resample != BICUBIC:
            raise CheckpointError(f"{source}: resample={settings.resample} is not implemented (only {BICUBIC}, "
                                  "bicubic, which every IDEFICS checkpoint uses); set \"resample\": 3")
        return settings


def _size_from_config(config: dict[str, Any], source: str) -> tuple[int, int]:
    if config.get("image_size") is not None:
        return int(config["image_size"]), int(config["image_size"])
    size = config.get("size")
    if size is None:
        return ImageSettings.height, ImageSettings.width
    if isinstance(size, int):
        return size, size
    if isinstance(size, dict) and size.get("height") and size.get("width"):
        return int(size["height"]), int(size["width"])
    raise CheckpointError(f"{source}: size {size!r} is not supported; IDEFICS resizes to a fixed square, "
                          "write \"image_size\": N (e.g. 224)")


class ImagePreprocessor:
    """uint8 images → normalised channel-first float32 `pixel_values`, as `IdeficsImageProcessorPil` computes them.

    Args:
        settings: what to do; `ImagePreprocessor.from_pretrained(folder)` reads them from a checkpoint.
        legacy_pass_order: resize like Pillow <= 12 rather than Pillow 13 (see `resize_bicubic`); match the Pillow
            that the transformers side uses when comparing bit for bit.
    """

    def __init__(self, settings: ImageSettings | None = None, *, legacy_pass_order: bool = False):
        self.settings = settings or ImageSettings()
        self.legacy_pass_order = legacy_pass_order
        self._mean = np.asarray(self.settings.image_mean, dtype=np.float32)
        self._std = np.asarray(self.settings.image_std, dtype=np.float32)

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, legacy_pass_order: bool = False) -> ImagePreprocessor:
        """Read `processor_config.json` ("image_processor" key) or, for older checkpoints, `preprocessor_config.json`.

        Raises:
            CheckpointError: neither file exists, or one is not valid JSON, or it asks for something unsupported.
        """
        folder = Path(folder)
        for name, key in (("processor_config.json", "image_processor"), ("preprocessor_config.json", None)):
            path = folder / name
            if not path.is_file():
                continue
            config = read_json(path)
            if key is not None:
                if not isinstance(config.get(key), dict):  # a processor config without image settings
                    continue
                config = config[key]
            logger.debug("image settings from %s", path)
            return cls(ImageSettings.from_dict(config, source=str(path)), legacy_pass_order=legacy_pass_order)
        raise CheckpointError(f"{folder} has no image settings (processor_config.json with an \"image_processor\" "
                              "entry, or preprocessor_config.json); save the processor with "
                              "IdeficsProcessor.save_pretrained(folder)")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(3, height, width) of one preprocessed image."""
        return 3, self.settings.height, self.settings.width

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """Preprocess one image.

        Args:
            image: uint8 [H, W], [H, W, 1], [H, W, 3] (RGB) or [H, W, 4] (RGBA).

        Returns:
            float32 [3, height, width].

        Raises:
            ImageError: an unsupported array, or (with do_resize off) an image of the wrong size.
        """
        s = self.settings
        _check_image(image)
        if s.do_convert_rgb:
            image = to_rgb(image)
        elif image.ndim != 3 or image.shape[2] != 3:
            raise ImageError(f"do_convert_rgb is off, so images must be RGB [H, W, 3]; got {image.shape}")
        if s.do_resize:
            image = resize_bicubic(image, s.height, s.width, legacy_pass_order=self.legacy_pass_order)
        elif image.shape[:2] != (s.height, s.width):
            raise ImageError(f"do_resize is off, so images must be {s.height}x{s.width}; got {image.shape[:2]}")
        pixels = image  # [H, W, 3]
        if s.do_rescale:
            pixels = (pixels.astype(np.float64) * s.rescale_factor).astype(np.float32)  # transformers' order
        if s.do_normalize:
            pixels = (pixels.astype(np.float32) - self._mean) / self._std
        return np.ascontiguousarray(np.moveaxis(pixels, -1, 0), dtype=np.float32)  # [3, H, W]

    def batch(self, images: list[np.ndarray]) -> np.ndarray:
        """Preprocess several images.

        Returns:
            float32 [N, 3, height, width].
        """
        out = np.zeros((len(images), *self.image_shape), dtype=np.float32)
        for i, image in enumerate(images):
            out[i] = self(image)
        return out
