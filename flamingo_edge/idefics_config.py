"""IDEFICS' `config.json` -> our FlamingoConfig, torch-free: what `flamingo-edge plan` and `info` read from a
checkpoint folder or a public config on a base install. The weights' importer (models/importers/idefics.py)
re-exports `config_from_hf` from here.
"""

from __future__ import annotations

from collections.abc import Mapping

from flamingo_edge.config import DecoderConfig, FlamingoConfig, ResamplerConfig, VisionConfig
from flamingo_edge.config_reader import REQUIRED, Section, checked, fail

MODEL_TYPE = "idefics"
FAMILY = "IDEFICS"  # for messages

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


def _rope_theta(hf: Section) -> float:
    """Only LLaMA's default rope is implemented; scaled variants would silently change every position."""
    rope, scaling = hf.nested("rope_parameters"), hf.nested("rope_scaling")
    rope_type = rope.data.get("rope_type", scaling.data.get("rope_type", scaling.data.get("type", "default")))
    if rope_type != "default":
        raise fail(hf.source, f"rope type {rope_type!r} is not supported", "only the default rotary embedding is")
    return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0, "positive"), "positive"))


def _vision_config(vision: Section) -> VisionConfig:
    width, heads = vision.get("embed_dim", 768, "count"), vision.get("num_attention_heads", 16, "count")
    if width % heads:
        raise fail(vision.source, f"vision_config.embed_dim={width} is not a multiple of "
                   f"vision_config.num_attention_heads={heads}", "transformers cannot run this config either; "
                   "fix config.json")
    return VisionConfig(
        image_size=vision.get("image_size", 224, "count"), patch_size=vision.get("patch_size", 14, "count"),
        width=width, layers=vision.get("num_hidden_layers", 32, "count"), heads=heads,
        mlp_width=vision.get("intermediate_size", 5120, "count"), act=vision.activation("gelu"),
        layer_norm_eps=vision.get("layer_norm_eps", 1e-5, "positive"),
        num_channels=vision.get("num_channels", 3, "count"),
    )


def _resampler_config(hf: Section, perceiver: Section, vision_width: int) -> ResamplerConfig:
    return ResamplerConfig(
        enabled=bool(hf.get("use_resampler", False, "flag")),  # the top-level flag is the one IDEFICS reads
        latents=perceiver.get("resampler_n_latents", 64, "count"), depth=perceiver.get("resampler_depth", 6, "count"),
        heads=perceiver.get("resampler_n_heads", 16, "count"),
        head_dim=perceiver.get("resampler_head_dim", 96, "count"), mlp_width=4 * vision_width, act="relu",
        qk_layer_norms=bool(perceiver.get("qk_layer_norms_perceiver", False, "flag")),
    )


def _decoder_config(hf: Section) -> DecoderConfig:
    layers, interval = hf.get("num_hidden_layers", REQUIRED, "count"), hf.get("cross_layer_interval", 1, "count")
    if layers % interval:
        raise fail(hf.source, f"num_hidden_layers={layers} is not a multiple of cross_layer_interval={interval}",
                   "transformers cannot run this config either; fix config.json")
    width, heads = hf.get("hidden_size", REQUIRED, "count"), hf.get("num_attention_heads", REQUIRED, "count")
    if width % heads:
        raise fail(hf.source, f"hidden_size={width} is not a multiple of num_attention_heads={heads}",
                   "transformers cannot run this config either; fix config.json")
    alpha_type = hf.data.get("alpha_type", "float")
    if alpha_type not in ("float", "vector"):
        raise fail(hf.source, f"alpha_type={alpha_type!r}", "expected 'float' or 'vector'")
    return DecoderConfig(
        vocab_size=hf.get("vocab_size", REQUIRED, "count"),
        additional_vocab_size=hf.get("additional_vocab_size", 0, "size"),
        width=width, layers=layers, heads=heads, mlp_width=hf.get("intermediate_size", REQUIRED, "count"),
        cross_layers=tuple(range(0, layers, interval)), cross_heads=heads, cross_head_dim=width // heads,
        cross_qk_norms=bool(hf.get("qk_layer_norms", False, "flag")), vector_gates=alpha_type == "vector",
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6, "positive"), rope_theta=_rope_theta(hf),
        max_positions=hf.get("max_position_embeddings", 2048, "count"), act=hf.activation("silu"),
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
        raise fail(source, f"model_type is {hf.get('model_type')!r}, not 'idefics'",
                   "pass the folder of an IDEFICS checkpoint (IdeficsForVisionText2Text.save_pretrained)")
    top = Section(hf, source, FAMILY)
    vision, perceiver = top.nested("vision_config"), top.nested("perceiver_config")
    for section, used in ((top, _USED_KEYS), (vision, _USED_VISION_KEYS), (perceiver, _USED_PERCEIVER_KEYS)):
        section.log_ignored(used)
    vision_config = _vision_config(vision)
    config = FlamingoConfig(family=MODEL_TYPE, vision=vision_config,
                            resampler=_resampler_config(top, perceiver, vision_config.width),
                            decoder=_decoder_config(top))
    return checked(config, source)
