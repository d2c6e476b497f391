"""The PyTorch reference model and checkpoint loading (imports torch)."""

from flamingo_edge.models.checkpoint import load_checkpoint, load_config
from flamingo_edge.models.config import DecoderConfig, FlamingoConfig, ResamplerConfig, VisionConfig
from flamingo_edge.models.flamingo import FlamingoModel

__all__ = [
    "DecoderConfig",
    "FlamingoConfig",
    "FlamingoModel",
    "ResamplerConfig",
    "VisionConfig",
    "load_checkpoint",
    "load_config",
]
