"""IDEFICS' `config.json` -> our FlamingoConfig, torch-free: what `flamingo-edge plan` and `info` read from a
checkpoint folder or a public config on a base install. The weights' importer (models/importers/idefics.py)
re-exports `config_from_hf` from here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from flamingo_edge.config import DecoderConfig, FlamingoConfig, ResamplerConfig, VisionConfig
from flamingo_edge.config_checks import config_problems, describe, is_int, is_number
from flamingo_edge.errors import CheckpointError

logger = logging.getLogger(__name__)

MODEL_TYPE = "idefics"
# The activations the model implements: the keys of models/layers.py ACTIVATIONS (a test checks they agree).
ACTIVATION_NAMES = ("gelu", "gelu_tanh", "quick_gelu", "relu", "silu")

# Upstream config keys that this importer reads; everything else is logged as ignored.
_USED_KEYS = {
    "model_type", "vocab_size", "additional_vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "hidden_act", "rms_norm_eps", "cross_layer_interval", "qk_layer_norms", "alpha_type",
    "use_resampler", "max_position_embeddings", "rope_parameters", "rope_theta", "rope_scaling", "bos_token_id",
    "eos_token_id", "pad_token_id", "tie_word_embeddings", "vision_config", "perceiver_config",
}
_USED_VISION_KEYS = {
    "embed_dim", "image_size", "patch_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "hidden_act", "layer_norm_eps", "num_channels",
}
_USED_PERCEIVER_KEYS = {
    "resampler_n_latents", "resampler_depth", "resampler_n_heads", "resampler_head_dim", "qk_layer_norms_perceiver",
}


def _fail(source: str, what: str, fix: str) -> CheckpointError:
    return CheckpointError(f"{source}: {what}; {fix}")


_REQUIRED = object()  # the default of a key the config must have
_FIX_VALUE = "fix that value in config.json (or restore the file saved with the checkpoint)"
# What a config value must be: a test, and its description for the message.
_KINDS = {
    "count": (lambda v: is_int(v) and v > 0, "a positive integer"),
    "size": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    "positive": (lambda v: is_number(v) and v > 0, "a positive number"),
    "flag": (lambda v: v is None or isinstance(v, bool), "true or false"),  # null reads as false, as in transformers
    "token": (lambda v: v is None or (is_int(v) and v >= 0), "a token id (an integer >= 0) or null"),
    "name": (lambda v: isinstance(v, str), "a string"),
}


@dataclass(frozen=True)
class _Section:
    """One object of config.json, read key by key with the type each key must have."""

    data: Mapping
    source: str
    prefix: str = ""  # "vision_config." for a nested object, for messages

    @classmethod
    def nested(cls, hf: Mapping, key: str, source: str) -> _Section:
        value = hf.get(key)
        if value is not None and not isinstance(value, Mapping):
            raise _fail(source, f"{key} is {describe(value)}, expected a JSON object", _FIX_VALUE)
        return cls(value or {}, source, f"{key}.")

    def get(self, key: str, default, kind: str):
        if key not in self.data and default is _REQUIRED:
            raise _fail(self.source, f"required key '{self.prefix}{key}' is missing",
                        "the file is not a complete IDEFICS config")
        value = self.data.get(key, default)
        test, expected = _KINDS[kind]
        if not test(value):
            raise _fail(self.source, f"{self.prefix}{key} is {describe(value)}, expected {expected}", _FIX_VALUE)
        return value


def _rope_theta(hf: _Section) -> float:
    """Only LLaMA's default rope is implemented; scaled variants would silently change every position."""
    rope = _Section.nested(hf.data, "rope_parameters", hf.source)
    scaling = _Section.nested(hf.data, "rope_scaling", hf.source)
    rope_type = rope.data.get("rope_type", scaling.data.get("rope_type", scaling.data.get("type", "default")))
    if rope_type != "default":
        raise _fail(hf.source, f"rope type {rope_type!r} is not supported", "only the default rotary embedding is")
    return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0, "positive"), "positive"))


def _activation(section: _Section, default: str) -> str:
    name = section.get("hidden_act", default, "name")
    if name not in ACTIVATION_NAMES:
        raise _fail(section.source, f"{section.prefix}hidden_act={name!r} is not supported",
                    f"supported: {sorted(ACTIVATION_NAMES)}")
    return name


def _log_ignored(source: str, section: str, data: Mapping, used: set[str]) -> None:
    ignored = sorted(set(data) - used)
    if ignored:
        logger.info("%s: %s keys not used by flamingo-edge (no effect on inference): %s", source, section, ignored)


def _vision_config(vision: _Section) -> VisionConfig:
    width, heads = vision.get("embed_dim", 768, "count"), vision.get("num_attention_heads", 16, "count")
    if width % heads:
        raise _fail(vision.source, f"vision_config.embed_dim={width} is not a multiple of "
                    f"vision_config.num_attention_heads={heads}", "transformers cannot run this config either; "
                    "fix config.json")
    return VisionConfig(
        image_size=vision.get("image_size", 224, "count"), patch_size=vision.get("patch_size", 14, "count"),
        width=width, layers=vision.get("num_hidden_layers", 32, "count"), heads=heads,
        mlp_width=vision.get("intermediate_size", 5120, "count"), act=_activation(vision, "gelu"),
        layer_norm_eps=vision.get("layer_norm_eps", 1e-5, "positive"),
        num_channels=vision.get("num_channels", 3, "count"),
    )


def _resampler_config(hf: _Section, perceiver: _Section, vision_width: int) -> ResamplerConfig:
    return ResamplerConfig(
        enabled=bool(hf.get("use_resampler", False, "flag")),  # the top-level flag is the one IDEFICS reads
        latents=perceiver.get("resampler_n_latents", 64, "count"), depth=perceiver.get("resampler_depth", 6, "count"),
        heads=perceiver.get("resampler_n_heads", 16, "count"),
        head_dim=perceiver.get("resampler_head_dim", 96, "count"), mlp_width=4 * vision_width, act="relu",
        qk_layer_norms=bool(perceiver.get("qk_layer_norms_perceiver", False, "flag")),
    )


def _decoder_config(hf: _Section) -> DecoderConfig:
    layers, interval = hf.get("num_hidden_layers", _REQUIRED, "count"), hf.get("cross_layer_interval", 1, "count")
    if layers % interval:
        raise _fail(hf.source, f"num_hidden_layers={layers} is not a multiple of cross_layer_interval={interval}",
                    "transformers cannot run this config either; fix config.json")
    width, heads = hf.get("hidden_size", _REQUIRED, "count"), hf.get("num_attention_heads", _REQUIRED, "count")
    if width % heads:
        raise _fail(hf.source, f"hidden_size={width} is not a multiple of num_attention_heads={heads}",
                    "transformers cannot run this config either; fix config.json")
    alpha_type = hf.data.get("alpha_type", "float")
    if alpha_type not in ("float", "vector"):
        raise _fail(hf.source, f"alpha_type={alpha_type!r}", "expected 'float' or 'vector'")
    return DecoderConfig(
        vocab_size=hf.get("vocab_size", _REQUIRED, "count"),
        additional_vocab_size=hf.get("additional_vocab_size", 0, "size"),
        width=width, layers=layers, heads=heads, mlp_width=hf.get("intermediate_size", _REQUIRED, "count"),
        cross_layers=tuple(range(0, layers, interval)), cross_heads=heads, cross_head_dim=width // heads,
        cross_qk_norms=bool(hf.get("qk_layer_norms", False, "flag")), vector_gates=alpha_type == "vector",
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6, "positive"), rope_theta=_rope_theta(hf),
        max_positions=hf.get("max_position_embeddings", 2048, "count"), act=_activation(hf, "silu"),
        bos_token_id=hf.get("bos_token_id", None, "token"), eos_token_id=hf.get("eos_token_id", None, "token"),
        pad_token_id=hf.get("pad_token_id", None, "token"),
    )


def config_from_hf(hf: Mapping, source: str = "config.json") -> FlamingoConfig:
    """Map an IDEFICS `config.json` (as a dict) to our FlamingoConfig.

    Args:
        hf: the parsed config.json.
        source: the file it came from, for messages.

    Raises:
        CheckpointError: the config is not IDEFICS, uses a variant we do not implement, or has a value of the wrong
            type (a string or null where a size goes) or out of range (a size <= 0); the message names the key.
    """
    if hf.get("model_type") != MODEL_TYPE:
        raise _fail(source, f"model_type is {hf.get('model_type')!r}, not 'idefics'",
                    "pass the folder of an IDEFICS checkpoint (IdeficsForVisionText2Text.save_pretrained)")
    top = _Section(hf, source)
    vision, perceiver = _Section.nested(hf, "vision_config", source), _Section.nested(hf, "perceiver_config", source)
    for section, data, used in (("top-level", hf, _USED_KEYS), ("vision_config", vision.data, _USED_VISION_KEYS),
                                ("perceiver_config", perceiver.data, _USED_PERCEIVER_KEYS)):
        _log_ignored(source, section, data, used)
    vision_config = _vision_config(vision)
    config = FlamingoConfig(family=MODEL_TYPE, vision=vision_config,
                            resampler=_resampler_config(top, perceiver, vision_config.width),
                            decoder=_decoder_config(top))
    problems = config_problems(config)
    if problems:  # what the key-by-key reading cannot see, in flamingo-edge's names
        raise _fail(source, "; ".join(problems) + " (flamingo-edge's names for the values read)", _FIX_VALUE)
    return config
