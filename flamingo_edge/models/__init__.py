"""The PyTorch reference model and checkpoint loading.

Names are resolved lazily (PEP 562) so that `flamingo_edge.models.config`, which is plain Python, can be imported by
the runtime without importing torch.
"""

from importlib import import_module

_EXPORTS = {
    "load_checkpoint": "flamingo_edge.models.checkpoint",
    "load_config": "flamingo_edge.models.checkpoint",
    "DecoderConfig": "flamingo_edge.models.config",
    "FlamingoConfig": "flamingo_edge.models.config",
    "ResamplerConfig": "flamingo_edge.models.config",
    "VisionConfig": "flamingo_edge.models.config",
    "FlamingoModel": "flamingo_edge.models.flamingo",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'flamingo_edge.models' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
