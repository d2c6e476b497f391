"""Llama 3.2 Vision's `config.json` (transformers' MllamaConfig) -> our FlamingoConfig, torch-free: what `plan`,
`info` and `load_checkpoint` read from an mllama checkpoint folder or a public config.

mllama as our switches (docs/mllama.md): the tiled ViT is `TiledVisionConfig`, the multi-modal projector takes the
resampler's place (`ResamplerConfig(kind="projector")`), and the text model is a Llama 3 decoder (grouped-query
attention, Llama 3.1 RoPE scaling) whose cross-attention layers *replace* decoder layers, with q/k RMSNorm, grouped
K/V heads, tanh gates and mllama's rule for rows before the first image (`cross_empty_rows="attend_all"`). Its
embedding has 8 rows more than its LM head (`input_only_vocab`), the first for `<|image|>`.
"""

from __future__ import annotations

from collections.abc import Mapping

from flamingo_edge.config import DecoderConfig, FlamingoConfig, ResamplerConfig, TiledVisionConfig
from flamingo_edge.config_checks import describe, is_int
from flamingo_edge.config_reader import FIX_VALUE, REQUIRED, Section, checked, fail

MODEL_TYPE = "mllama"
FAMILY = "Llama 3.2 Vision (mllama)"  # for messages
EXTRA_EMBEDDING_ROWS = 8  # MllamaTextModel's embed_tokens has vocab_size + 8 rows, its lm_head vocab_size

_USED_KEYS = {"model_type", "vision_config", "text_config", "image_token_index", "tie_word_embeddings"}
_USED_VISION_KEYS = {
    "hidden_size", "num_hidden_layers", "num_global_layers", "attention_heads", "intermediate_size", "image_size",
    "patch_size", "max_num_tiles", "supported_aspect_ratios", "intermediate_layers_indices", "vision_output_dim",
    "hidden_act", "norm_eps", "num_channels",
}
_USED_TEXT_KEYS = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "cross_attention_layers", "rms_norm_eps", "rope_parameters", "rope_theta", "rope_scaling",
    "max_position_embeddings", "hidden_act", "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings",
}
# transformers' ACT2FN names that our activations spell differently
_ACTIVATION_NAMES = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}


def _int_list(section: Section, key: str, default) -> list:
    value = section.data.get(key, default)
    if value is REQUIRED:
        raise section.missing(key)
    if not isinstance(value, list) or not all(is_int(v) for v in value):
        raise fail(section.source, f"{section.prefix}{key} is {describe(value)}, expected a list of integers",
                   FIX_VALUE)
    return value


def _side(section: Section, key: str, default: int) -> int:
    """An int, or a square [s, s] (transformers allows a list)."""
    value = section.data.get(key, default)
    if isinstance(value, list) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    if not is_int(value) or value <= 0:
        raise fail(section.source, f"{section.prefix}{key} is {describe(value)}, expected a positive integer "
                   "(tiles and patches are square)", FIX_VALUE)
    return value


def _vision_config(vision: Section, text_width: int) -> TiledVisionConfig:
    ratios = vision.data.get("supported_aspect_ratios", REQUIRED)
    if ratios is REQUIRED:
        raise vision.missing("supported_aspect_ratios")
    if not isinstance(ratios, list) or not all(isinstance(r, list) and len(r) == 2 and all(is_int(v) and v > 0
                                                                                           for v in r) for r in ratios):
        raise fail(vision.source, f"vision_config.supported_aspect_ratios is {describe(ratios)}, expected a list "
                   "of [rows, columns] pairs", FIX_VALUE)
    return TiledVisionConfig(
        hidden_size=vision.get("hidden_size", 1280, "count"), num_hidden_layers=vision.get("num_hidden_layers", 32,
                                                                                           "count"),
        num_global_layers=vision.get("num_global_layers", 8, "count"),
        attention_heads=vision.get("attention_heads", 16, "count"),
        intermediate_size=vision.get("intermediate_size", 5120, "count"),
        image_size=_side(vision, "image_size", 448), patch_size=_side(vision, "patch_size", 14),
        max_num_tiles=vision.get("max_num_tiles", 4, "count"),
        supported_aspect_ratios=tuple(tuple(r) for r in ratios),
        intermediate_layers_indices=tuple(_int_list(vision, "intermediate_layers_indices", [3, 7, 15, 23, 30])),
        vision_output_dim=vision.get("vision_output_dim", 7680, "count"), text_hidden_size=text_width,
        hidden_act=vision.activation("gelu", _ACTIVATION_NAMES), norm_eps=vision.get("norm_eps", 1e-5, "positive"),
        num_channels=vision.get("num_channels", 3, "count"),
    )


def llama_rope_fields(config: Section, *, default_theta: float = 10000.0) -> dict:
    """theta and the frequency scaling of a LLaMA config (a text_config here; LLaMA language models of OpenFlamingo
    too): plain RoPE, or Llama 3.1's ("llama3"), from `rope_parameters` (transformers 5) or `rope_scaling` (4.x), as
    DecoderConfig fields.

    Raises:
        CheckpointError: another rope type, a "llama3" entry without its factors, or a value of the wrong kind.
    """
    rope = config.nested("rope_parameters" if config.data.get("rope_parameters") else "rope_scaling")
    kind = rope.data.get("rope_type", rope.data.get("type", "default"))
    theta = rope.get("rope_theta", config.get("rope_theta", default_theta, "positive"), "positive")
    fields = dict(rope_theta=float(theta))
    if kind == "default":
        return fields
    if kind != "llama3":
        raise fail(config.source, f"rope type {kind!r} is not supported",
                   "plain RoPE and Llama 3.1's 'llama3' scaling are")
    return dict(fields, rope_type="llama3", rope_factor=float(rope.get("factor", REQUIRED, "positive")),
                rope_low_freq_factor=float(rope.get("low_freq_factor", REQUIRED, "positive")),
                rope_high_freq_factor=float(rope.get("high_freq_factor", REQUIRED, "positive")),
                rope_original_max_positions=rope.get("original_max_position_embeddings", REQUIRED, "count"))


def _token(text: Section, key: str) -> int | None:
    """A token id; of a list (Llama 3's several EOS ids), the first."""
    value = text.data.get(key)
    if isinstance(value, list):
        text = Section({key: value[0] if value else None}, text.source, text.family, text.prefix)
    return text.get(key, None, "token")


def _decoder_config(text: Section) -> DecoderConfig:
    width, heads = text.get("hidden_size", REQUIRED, "count"), text.get("num_attention_heads", REQUIRED, "count")
    kv_heads = text.get("num_key_value_heads", heads, "count")
    layers = text.get("num_hidden_layers", REQUIRED, "count")
    cross = _int_list(text, "cross_attention_layers", REQUIRED)
    if text.data.get("tie_word_embeddings"):
        raise fail(text.source, "tie_word_embeddings=true", "mllama's LM head is its own tensor; fix config.json")
    return DecoderConfig(
        vocab_size=text.get("vocab_size", REQUIRED, "count"), additional_vocab_size=0,
        input_only_vocab=EXTRA_EMBEDDING_ROWS, width=width, layers=layers, heads=heads,
        kv_heads=0 if kv_heads == heads else kv_heads, mlp_width=text.get("intermediate_size", REQUIRED, "count"),
        cross_layers=tuple(cross), cross_heads=heads, cross_head_dim=width // heads,
        cross_kv_heads=0 if kv_heads == heads else kv_heads, cross_qk_norms=True, cross_placement="replace",
        cross_empty_rows="attend_all", rms_norm_eps=text.get("rms_norm_eps", 1e-5, "positive"),
        max_positions=text.get("max_position_embeddings", 131072, "count"),
        act=text.activation("silu", _ACTIVATION_NAMES),
        **llama_rope_fields(text, default_theta=500000.0), bos_token_id=_token(text, "bos_token_id"),
        eos_token_id=_token(text, "eos_token_id"), pad_token_id=_token(text, "pad_token_id"),
    )


def projector_config() -> ResamplerConfig:
    """The resampler's place taken by mllama's projector (no perceiver fields)."""
    return ResamplerConfig(enabled=True, kind="projector", latents=0, depth=0, heads=0, head_dim=0, mlp_width=0)


def config_from_hf(hf: Mapping, source: str = "config.json") -> FlamingoConfig:
    """Map an mllama `config.json` (as a dict) to our FlamingoConfig.

    Raises:
        CheckpointError: the config is not mllama, uses a variant we do not implement, or has a value of the wrong
            type or out of range; the message names the key.
    """
    if hf.get("model_type") != MODEL_TYPE:
        raise fail(source, f"model_type is {hf.get('model_type')!r}, not 'mllama'",
                   "pass the folder of a Llama 3.2 Vision checkpoint (MllamaForConditionalGeneration.save_pretrained)")
    top = Section(hf, source, FAMILY)
    vision, text = top.nested("vision_config"), top.nested("text_config")
    for section, used in ((top, _USED_KEYS), (vision, _USED_VISION_KEYS), (text, _USED_TEXT_KEYS)):
        section.log_ignored(used)
    decoder = _decoder_config(text)
    config = FlamingoConfig(family=MODEL_TYPE, vision=_vision_config(vision, decoder.width),
                            resampler=projector_config(), decoder=decoder)
    return checked(config, source)
