"""The PyTorch reference model and checkpoint loading.

Names are resolved lazily (PEP 562) so that importing the package costs nothing; the config dataclasses live in
`flamingo_edge.config` (plain Python, below every stage) and are re-exported here for convenience. The package needs
the `[export]` extra: on the base install, importing it raises FeatureUnavailableError naming that extra.
"""

from importlib import import_module

from flamingo_edge.extras import require

require("torch", "export", "the PyTorch reference model (flamingo_edge.models)")
require("safetensors", "export", "the PyTorch reference model (flamingo_edge.models)")

_EXPORTS = {
    "load_checkpoint": "flamingo_edge.models.checkpoint",
    "load_config": "flamingo_edge.models.checkpoint",
    "DecoderConfig": "flamingo_edge.config",
    "FlamingoConfig": "flamingo_edge.config",
    "ResamplerConfig": "flamingo_edge.config",
    "VisionConfig": "flamingo_edge.config",
    "FlamingoModel": "flamingo_edge.models.flamingo",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'flamingo_edge.models' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
