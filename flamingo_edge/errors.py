"""The one exception hierarchy of flamingo-edge.

Every error a user can cause is a `FlamingoEdgeError` subclass whose message says what was received, what was
expected and how to fix it. Only the CLI turns these into exit codes.
"""

from __future__ import annotations


class FlamingoEdgeError(Exception):
    """Root of every error raised on purpose by flamingo-edge."""


class CheckpointError(FlamingoEdgeError):
    """A checkpoint folder, its config or its weights cannot be used (missing, corrupt, wrong family, bad keys)."""


class UsageError(FlamingoEdgeError):
    """A setting is out of range (sampling parameters, cache sizes) or an object is used after it was closed."""


class ImageError(FlamingoEdgeError):
    """An image cannot be read or has a layout we cannot preprocess."""


class PromptError(FlamingoEdgeError):
    """A prompt cannot be turned into model inputs (e.g. an image count that does not match the markers)."""


class PromptTooLongError(PromptError):
    """A prompt is longer than the model or engine allows."""


class ExportError(FlamingoEdgeError):
    """An export folder is incomplete, or its graphs do not match its export.json."""


class GraphContractError(FlamingoEdgeError):
    """A graph's inputs or outputs differ from the graph contract."""


class ParityError(FlamingoEdgeError):
    """Two implementations disagree beyond tolerance; the message lists every failing output."""


class EngineMismatchError(FlamingoEdgeError):
    """An engine was built for another GPU or TensorRT version."""


class FeatureUnavailableError(FlamingoEdgeError):
    """A feature needs a package or a version that this machine does not have."""


class CalibrationError(FlamingoEdgeError):
    """Calibration input that cannot be used (no images, an unreadable video), or a calibration folder that is
    incomplete or belongs to another export."""


class EngineBuildError(FlamingoEdgeError):
    """TensorRT could not parse a graph or build an engine for the target asked for."""


class SourceError(FlamingoEdgeError):
    """A frame source (video file, image folder, camera, stream) that cannot be opened, or that was lost for good."""


class MemoryPlanError(FlamingoEdgeError):
    """The memory plan says the target cannot hold what was asked for (engines, context, images)."""
