"""Image preprocessing in numpy + OpenCV, equal to the upstream preprocessing of each model family.

Two resize rules, chosen by the checkpoint's settings (`ImageSettings`), never by family name:
- squash to a fixed (height, width), as transformers' `IdeficsImageProcessorPil` does (IDEFICS, the default);
- shorter side to `shortest_edge` (aspect ratio kept) then a centre crop, as open_clip's eval transform does with
  torchvision (`Resize(S, BICUBIC)`, `CenterCrop(S)`, `convert("RGB")`, `ToTensor`, `Normalize`; OpenFlamingo).

Both resize with Pillow (`Image.resize(..., BICUBIC)` on uint8); `runtime/resize.py` reproduces that bit for bit in
numpy. The uint8 image is then rescaled by 1/255 and normalised in float32. transformers rescales in float64 and
casts, torchvision's ToTensor divides a float32 tensor by 255: both give the same float32 for every uint8 value
(checked exhaustively in the tests), and both normalise as float32 (x - mean) / std, so `pixel_values` agree to
the last float32 bit on x86-64.

Llama 3.2 Vision's tiling preprocessor (`MllamaImagePreprocessor`) lives in `runtime/mllama_image.py`; both follow
`ImagePreprocessing`, the interface the processor and the pipeline use, and `uses_mllama_processor(folder)` tells which
one a checkpoint needs.

Nothing here imports torch, transformers or Pillow.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from flamingo_edge.artifacts import read_json
from flamingo_edge.config_checks import is_int, is_number
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


def _premultiply(rgba: np.ndarray) -> np.ndarray:
    """RGBA → RGBa (colour times alpha), Pillow's `rgbA2rgba` in Convert.c: MULDIV255(value, alpha)."""
    alpha = rgba[..., 3:].astype(np.int64)  # [H, W, 1]
    tmp = rgba[..., :3].astype(np.int64) * alpha + 128
    return np.concatenate([(((tmp >> 8) + tmp) >> 8).astype(np.uint8), rgba[..., 3:]], axis=-1)


def _unpremultiply(rgba: np.ndarray) -> np.ndarray:
    """RGBa → RGBA, Pillow's `rgba2rgbA` in Convert.c: min(255 * value // alpha, 255); kept where alpha is 0 or 255."""
    value = rgba[..., :3].astype(np.int64)  # [H, W, 3]
    alpha = rgba[..., 3:].astype(np.int64)  # [H, W, 1]
    divided = np.minimum(255 * value // np.maximum(alpha, 1), 255)
    keep = (alpha == 0) | (alpha == 255)
    return np.concatenate([np.where(keep, value, divided).astype(np.uint8), rgba[..., 3:]], axis=-1)


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


def import_opencv():
    """OpenCV, with its own log lines (`[ WARN:0@0.01] ... PNG input buffer is incomplete`) and FFmpeg's (`moov atom
    not found`, `Connection refused`) kept off the terminal: the typed error we raise says what went wrong, once.

    Call it instead of `import cv2` wherever an image is decoded or a capture opened: FFmpeg reads its log level
    once, when OpenCV first opens a capture with it. The user's own OPENCV_LOG_LEVEL / OPENCV_FFMPEG_LOGLEVEL win, and
    so does verbose logging (flamingo-edge -v).
    """
    import cv2

    if not logging.getLogger("flamingo_edge").isEnabledFor(logging.INFO):
        os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET
        if "OPENCV_LOG_LEVEL" not in os.environ:
            logs = getattr(cv2.utils, "logging", None)  # OpenCV 5; 4.x has only cv2.setLogLevel (2 = errors)
            logs.setLogLevel(logs.LOG_LEVEL_ERROR) if logs is not None else cv2.setLogLevel(2)
    return cv2


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
    cv2 = import_opencv()  # only image files need OpenCV; arrays from a camera or a caller do not

    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise ImageError(f"{path} is not an image OpenCV can decode (empty, corrupt or an unsupported format); "
                         "re-save it as PNG or JPEG")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


# -------------------------------------------------------------------------------------------------- geometry


def shortest_edge_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """The size torchvision's `Resize(shortest_edge)` gives an image (`_compute_resized_output_size`).

    The shorter side becomes `shortest_edge`; the longer one `int(shortest_edge * long / short)`, a float division
    truncated, exactly as torchvision writes it.

    Returns:
        (new_height, new_width).
    """
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest_edge * long / short)
    return (new_long, shortest_edge) if width <= height else (shortest_edge, new_long)


def center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """torchvision's `center_crop` of a [H, W, C] image: the centre (height, width) window.

    A side shorter than the crop is first zero-padded, (crop - side) // 2 before and the rest after (torchvision pads
    PIL images with 0). The window then starts at int(round((side - crop) / 2.0)): Python's round, half to even, so
    an excess of 3 starts at 2 and an excess of 5 at 2 (transformers' `center_crop` floors instead).

    Returns:
        [height, width, C], a view of `image` when no padding was needed.
    """
    in_height, in_width = image.shape[:2]
    if height > in_height or width > in_width:
        pad_height, pad_width = max(height - in_height, 0), max(width - in_width, 0)
        image = np.pad(image, ((pad_height // 2, (pad_height + 1) // 2), (pad_width // 2, (pad_width + 1) // 2),
                               (0, 0)))
        in_height, in_width = image.shape[:2]
    top = int(round((in_height - height) / 2.0))
    left = int(round((in_width - width) / 2.0))
    return image[top : top + height, left : left + width]


# ------------------------------------------------------------------------------------------------------ settings


class AlphaHandling(str, Enum):
    """What becomes of the alpha channel of an RGBA image ([H, W, 4]) before normalisation."""

    # transformers' `convert_to_rgb`, before resizing: composite onto opaque white (IDEFICS).
    COMPOSITE_ON_WHITE = "composite_on_white"
    # open_clip on a PIL RGBA image: Pillow resizes it premultiplied (RGBa), and `convert("RGB")` after the crop
    # drops the alpha channel (OpenFlamingo).
    DROP_AFTER_RESIZE = "drop_after_resize"


@dataclass(frozen=True)
class ImageSettings:
    """Image preprocessing settings: `processor_config.json` → "image_processor", in transformers' vocabulary.

    The steps, in order: convert to RGB (`do_convert_rgb`; see `alpha_handling` for RGBA), resize with Pillow's
    bicubic filter (`do_resize`: to (height, width), or the shorter side to `shortest_edge`), centre crop to
    `crop_size` (torchvision's `CenterCrop`), rescale by `rescale_factor`, normalise with `image_mean`/`image_std`.
    """

    height: int = 224  # resize target without `shortest_edge` (IDEFICS squashes to the square `image_size`)
    width: int = 224
    image_mean: tuple[float, ...] = IDEFICS_MEAN
    image_std: tuple[float, ...] = IDEFICS_STD
    rescale_factor: float = 1 / 255
    resample: int = BICUBIC  # only bicubic is implemented
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True
    shortest_edge: int | None = None  # `size: {"shortest_edge": S}`: shorter side to S, aspect ratio kept
    crop_size: tuple[int, int] | None = None  # (height, width) of the centre crop (`do_center_crop`); None: no crop
    alpha_handling: AlphaHandling = AlphaHandling.COMPOSITE_ON_WHITE

    def __post_init__(self):
        object.__setattr__(self, "alpha_handling", _alpha_handling(self.alpha_handling, "ImageSettings"))
        sizes = {"height": self.height, "width": self.width, "shortest_edge": self.shortest_edge}
        if self.crop_size is not None:
            sizes |= dict(zip(("crop height", "crop width"), self.crop_size))
        problems = settings_problems(self, sizes, ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"))
        if problems:
            raise CheckpointError(f"image settings: {'; '.join(problems)}; fix that value (or re-save the "
                                  "processor with its save_pretrained)")
        if self.do_resize and self.shortest_edge is not None and self.crop_size is None:
            raise CheckpointError("image settings: a resize to shortest_edge without a centre crop gives images of "
                                  "different sizes, which cannot be batched; add \"do_center_crop\": true and "
                                  "\"crop_size\": {\"height\": S, \"width\": S}")
        if self.do_resize and self.resample != BICUBIC:
            raise CheckpointError(f"image settings: resample={self.resample} is not implemented (only {BICUBIC}, "
                                  "bicubic, which IDEFICS and open_clip use); set \"resample\": 3")

    @property
    def output_size(self) -> tuple[int, int]:
        """(height, width) of a preprocessed image: the crop size, else the resize target."""
        return self.crop_size if self.crop_size is not None else (self.height, self.width)

    @classmethod
    def from_dict(cls, config: dict[str, Any], source: str = "image processor config") -> ImageSettings:
        """Read the fields transformers' image processors write; `image_size` wins over `size`.

        Raises:
            CheckpointError: a size, crop or resampling filter that this runtime does not implement.
        """
        try:
            height, width, shortest_edge = _size_from_config(config, source)
            names = ("rescale_factor", "resample", "do_resize", "do_rescale", "do_normalize", "do_convert_rgb")
            fields = {name: config[name] for name in names if config.get(name) is not None}
            for name in ("image_mean", "image_std"):
                if config.get(name) is not None:
                    value = config[name]
                    fields[name] = tuple(float(v) for v in (value if isinstance(value, list) else [value] * 3))
            if config.get("alpha_handling") is not None:
                fields["alpha_handling"] = _alpha_handling(config["alpha_handling"], source)
            crop_size = _crop_size_from_config(config, source)
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"{source}: cannot read the image settings ({error}); re-save the checkpoint "
                                  "with its processor's save_pretrained") from error
        try:
            return cls(height=height, width=width, shortest_edge=shortest_edge, crop_size=crop_size, **fields)
        except CheckpointError as error:
            raise CheckpointError(f"{source}: {error}") from error

    def to_dict(self) -> dict[str, Any]:
        """These settings in the vocabulary `from_dict` reads (transformers' names, plus `alpha_handling`)."""
        size = ({"shortest_edge": self.shortest_edge} if self.shortest_edge is not None
                else {"height": self.height, "width": self.width})
        crop = None if self.crop_size is None else {"height": self.crop_size[0], "width": self.crop_size[1]}
        return {"do_resize": self.do_resize, "size": size, "resample": self.resample,
                "do_center_crop": crop is not None, "crop_size": crop, "do_rescale": self.do_rescale,
                "rescale_factor": self.rescale_factor, "do_normalize": self.do_normalize,
                "image_mean": list(self.image_mean), "image_std": list(self.image_std),
                "do_convert_rgb": self.do_convert_rgb, "alpha_handling": self.alpha_handling.value}


def settings_problems(settings, sizes: dict[str, Any], switches: tuple[str, ...]) -> list[str]:
    """What is wrong with an image processor's values (`settings`: its `rescale_factor`, `image_mean`, `image_std`):
    `sizes` that are not positive integers, a rescale factor that is not a positive number, a mean or std that is
    not three numbers (a std of 0 would divide by it), `switches` that are not true or false."""
    problems = [f"{name} is {value!r}, expected a positive integer" for name, value in sizes.items()
                if value is not None and not (is_int(value) and value > 0)]
    if not (is_number(settings.rescale_factor) and settings.rescale_factor > 0):
        problems.append(f"rescale_factor is {settings.rescale_factor!r}, expected a positive number")
    for name, value, positive in (("image_mean", settings.image_mean, False), ("image_std", settings.image_std, True)):
        if len(value) != 3 or not all(is_number(v) for v in value) or (positive and min(value) <= 0):
            problems.append(f"{name} is {list(value)!r}, expected three numbers" + (" > 0" if positive else ""))
    problems += [f"{name} is {getattr(settings, name)!r}, expected true or false" for name in switches
                 if not isinstance(getattr(settings, name), bool)]
    return problems


def _alpha_handling(value: Any, source: str) -> AlphaHandling:
    try:
        return AlphaHandling(value)
    except ValueError:
        choices = ", ".join(repr(a.value) for a in AlphaHandling)
        raise CheckpointError(f"{source}: alpha_handling {value!r} is not one of {choices}") from None


def _size_from_config(config: dict[str, Any], source: str) -> tuple[int, int, int | None]:
    """(height, width, shortest_edge) from `image_size` or `size` (an int, {"height", "width"} or
    {"shortest_edge"})."""
    if config.get("image_size") is not None:
        return int(config["image_size"]), int(config["image_size"]), None
    size = config.get("size")
    if size is None:
        return ImageSettings.height, ImageSettings.width, None
    if isinstance(size, int):
        return size, size, None
    if isinstance(size, dict) and size.get("height") and size.get("width"):
        return int(size["height"]), int(size["width"]), None
    if isinstance(size, dict) and size.get("shortest_edge") and set(size) == {"shortest_edge"}:
        return ImageSettings.height, ImageSettings.width, int(size["shortest_edge"])
    raise CheckpointError(f"{source}: size {size!r} is not supported; write \"image_size\": N (a square, e.g. "
                          "224), \"size\": {\"height\": H, \"width\": W} or \"size\": {\"shortest_edge\": S} with a "
                          "centre crop")


def _crop_size_from_config(config: dict[str, Any], source: str) -> tuple[int, int] | None:
    """(height, width) of the centre crop when `do_center_crop` is on, else None."""
    if not config.get("do_center_crop"):
        return None
    crop = config.get("crop_size")
    if isinstance(crop, int):
        return crop, crop
    if isinstance(crop, dict) and crop.get("height") and crop.get("width"):
        return int(crop["height"]), int(crop["width"])
    raise CheckpointError(f"{source}: do_center_crop is on but crop_size is {crop!r}; write \"crop_size\": "
                          "{\"height\": S, \"width\": S}")


# ------------------------------------------------------------------------------------------- checkpoint files

PROCESSOR_CONFIG = "processor_config.json"  # transformers >= 4.47: {"image_processor": {...}, "processor_class": ...}
PREPROCESSOR_CONFIG = "preprocessor_config.json"  # older checkpoints: the image processor's settings alone
# transformers' names for Llama 3.2 Vision's processor and its image processors (slow, Pil and fast classes)
MLLAMA_PROCESSOR_CLASS = "MllamaProcessor"
MLLAMA_IMAGE_PROCESSOR_TYPES = ("MllamaImageProcessor", "MllamaImageProcessorPil", "MllamaImageProcessorFast")


def read_image_processor_config(folder: str | Path) -> tuple[Path, dict[str, Any]]:
    """The image processor's settings of a checkpoint or export folder, and the file they came from.

    `processor_config.json`'s "image_processor" entry wins; older checkpoints keep them in `preprocessor_config.json`.

    Raises:
        CheckpointError: neither file holds image settings, or one is not valid JSON.
    """
    folder = Path(folder)
    for name, key in ((PROCESSOR_CONFIG, "image_processor"), (PREPROCESSOR_CONFIG, None)):
        path = folder / name
        if not path.is_file():
            continue
        config = read_json(path)
        if key is not None:
            if not isinstance(config.get(key), dict):  # a processor config without image settings
                continue
            config = config[key]
        return path, config
    raise CheckpointError(f"{folder} has no image settings (processor_config.json with an \"image_processor\" "
                          "entry, or preprocessor_config.json); save the processor with its save_pretrained(folder)")


def uses_mllama_processor(folder: str | Path) -> bool:
    """Whether the folder's processor is transformers' `MllamaProcessor` (Llama 3.2 Vision).

    What `save_pretrained` records decides: "processor_class" or the image processor's "image_processor_type" in
    `processor_config.json` or `preprocessor_config.json` (an export copies both unchanged). The folder's name never
    does.

    Raises:
        CheckpointError: one of the files is not valid JSON.
    """
    folder = Path(folder)
    for name in (PROCESSOR_CONFIG, PREPROCESSOR_CONFIG):
        path = folder / name
        if not path.is_file():
            continue
        config = read_json(path)
        image_processor = config.get("image_processor")
        image_processor = image_processor if isinstance(image_processor, dict) else config
        if (config.get("processor_class") == MLLAMA_PROCESSOR_CLASS
                or image_processor.get("image_processor_type") in MLLAMA_IMAGE_PROCESSOR_TYPES):
            return True
    return False


# -------------------------------------------------------------------------------------------------- preprocessor


class ImagePreprocessing(Protocol):
    """What the processor and the pipeline ask of an image preprocessor (`ImagePreprocessor`,
    `mllama_image.MllamaImagePreprocessor`).

    An image fills `slots_per_image` cross-attention slots of the decoder: 1 for a CLIP-style image, one per tile
    for mllama (`image_attention_mask` has M * slots_per_image columns, image-major).
    """

    slots_per_image: int

    @property
    def image_shape(self) -> tuple[int, ...]:
        """The shape of one preprocessed image, `__call__`'s output."""

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """One image → its float32 pixel values, `image_shape`."""

    def vision_feed(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """The `vision` graph's inputs for one image, batch dim 1."""

    def padding_feed(self) -> dict[str, np.ndarray] | None:
        """The `vision` feed of an image slot that a row does not use, as upstream fills it; None: all zeros."""

    def tiles_of(self, image: np.ndarray) -> int:
        """How many of the image's `slots_per_image` slots hold real content (the rest are masked)."""


class ImagePreprocessor:
    """uint8 images → normalised channel-first float32 `pixel_values`, as the checkpoint's upstream processor.

    Args:
        settings: what to do; `ImagePreprocessor.from_pretrained(folder)` reads them from a checkpoint.
        legacy_pass_order: resize like Pillow <= 12 rather than Pillow 13 (see `resize_bicubic`); match the Pillow
            that the reference side uses when comparing bit for bit.
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
            CheckpointError: neither file exists, or one is not valid JSON, or it asks for something unsupported
                (among them an mllama image processor: see `uses_mllama_processor`).
        """
        path, config = read_image_processor_config(folder)
        if uses_mllama_processor(folder):
            raise CheckpointError(f"{path} holds Llama 3.2 Vision's tiling image processor, not a CLIP-style one; "
                                  "load it with mllama_image.MllamaImagePreprocessor.from_pretrained(folder), or "
                                  "load the whole processor with Processor.from_pretrained(folder)")
        logger.debug("image settings from %s", path)
        return cls(ImageSettings.from_dict(config, source=str(path)), legacy_pass_order=legacy_pass_order)

    slots_per_image = 1  # one image is one cross-attention slot of the decoder

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(3, height, width) of one preprocessed image."""
        return 3, *self.settings.output_size

    def vision_feed(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """The `vision` graph's feed for one image: {"pixel_values": float32 [1, 3, height, width]}.

        Raises:
            ImageError: as `__call__`.
        """
        return {"pixel_values": self(image)[None]}

    def padding_feed(self) -> None:
        """None: an unused image slot is all zeros (IDEFICS fills missing images with zero pixels)."""
        return None

    def tiles_of(self, image: np.ndarray) -> int:
        """1: every image fills its one slot."""
        return 1

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """Preprocess one image.

        Args:
            image: uint8 [H, W], [H, W, 1], [H, W, 3] (RGB) or [H, W, 4] (RGBA).

        Returns:
            float32 [3, height, width].

        Raises:
            ImageError: an unsupported array, or (with do_resize off and no crop) an image of the wrong size.
        """
        s = self.settings
        _check_image(image)
        keep_alpha = (s.do_convert_rgb and s.alpha_handling is AlphaHandling.DROP_AFTER_RESIZE
                      and image.ndim == 3 and image.shape[2] == 4)
        if s.do_convert_rgb and not keep_alpha:
            image = to_rgb(image)
        elif not s.do_convert_rgb and (image.ndim != 3 or image.shape[2] != 3):
            raise ImageError(f"do_convert_rgb is off, so images must be RGB [H, W, 3]; got {image.shape}")
        if s.do_resize:
            image = self._resize(image)
        elif s.crop_size is None and image.shape[:2] != (s.height, s.width):
            raise ImageError(f"do_resize is off, so images must be {s.height}x{s.width}; got {image.shape[:2]}")
        if s.crop_size is not None:
            image = center_crop(image, *s.crop_size)
        pixels = image[..., :3]  # [H, W, 3]; open_clip's convert("RGB") after the crop drops an alpha channel
        if s.do_rescale:
            pixels = (pixels.astype(np.float64) * s.rescale_factor).astype(np.float32)  # transformers' order
        if s.do_normalize:
            pixels = (pixels.astype(np.float32) - self._mean) / self._std
        return np.ascontiguousarray(np.moveaxis(pixels, -1, 0), dtype=np.float32)  # [3, H, W]

    def _resize(self, image: np.ndarray) -> np.ndarray:
        """Pillow's `Image.resize(..., BICUBIC)` to the settings' target; RGBA is resized premultiplied, as Pillow
        does (`Image.resize` converts RGBA to RGBa and back)."""
        s = self.settings
        in_height, in_width = image.shape[:2]
        height, width = (s.height, s.width) if s.shortest_edge is None else shortest_edge_size(
            in_height, in_width, s.shortest_edge)
        if (height, width) == (in_height, in_width):
            return image  # Pillow returns a copy, without the RGBa round trip
        premultiplied = image.shape[2] == 4
        if premultiplied:
            image = _premultiply(image)
        image = resize_bicubic(image, height, width, legacy_pass_order=self.legacy_pass_order)
        return _unpremultiply(image) if premultiplied else image

    def batch(self, images: list[np.ndarray]) -> np.ndarray:
        """Preprocess several images.

        Returns:
            float32 [N, 3, height, width].
        """
        out = np.zeros((len(images), *self.image_shape), dtype=np.float32)
        for i, image in enumerate(images):
            out[i] = self(image)
        return out
