"""The language models OpenFlamingo builds on (LLaMA, MPT, GPT-NeoX) -> DecoderConfig fields and our weight names.

One entry per family in `LANGUAGE_MODELS`: how to read its Hugging Face `config.json`, where its decoder layers
live (OpenFlamingo hangs its gated blocks on them), and how its tensors map onto ours. Names follow transformers'
modeling files (models/llama, models/mpt, models/gpt_neox) and, for the released OpenFlamingo LMs, their own remote
code: mosaicml/mpt-7b (`transformer.blocks.N.norm_1` / `attn.Wqkv` / `ffn.up_proj`, the same names as transformers'
MPT), anas-awadalla/mpt-1b-redpajama-200b (mosaic_gpt: `ln_1` / `attn.Wqkv` / `mlp.mlp_up`) and
togethercomputer/RedPajama-INCITE-3B (transformers' GPT-NeoX). Fused projections are split here, so the model has
one q, k and v projection whatever the family.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from flamingo_edge.config import DecoderConfig
from flamingo_edge.config_reader import REQUIRED, Section, fail as _fail
from flamingo_edge.mllama_config import llama_rope_fields

logger = logging.getLogger(__name__)

Get = Callable[[str], torch.Tensor]  # upstream tensor by name (raises CheckpointError naming it when missing)
Has = Callable[[str], bool]


@dataclass(frozen=True)
class LanguageModel:
    """What the converter needs to know about one LM family."""

    name: str  # as users say it: "llama", "mpt", "gpt_neox"
    layers_path: str  # the decoder layers' ModuleList (open_flamingo's decoder_layers_attr_name)
    embedding: str  # the input embedding tensor
    head: str | None  # the LM head tensor; None when the family always ties it to the embedding
    decoder_fields: Callable[[Mapping[str, Any], str], dict[str, Any]]  # HF config -> DecoderConfig keyword args
    layer_weights: Callable[[Get, Has, str, int], dict[str, torch.Tensor]]  # (get, has, "L.i.", heads) -> ours
    final_norm: tuple[str, ...]  # final norm tensors (weight [, bias])
    unused: tuple[str, ...] = ()  # regexes of stored tensors the forward never reads (buffers of old versions)
    tied_by_default: bool = False  # the LM head is the input embedding unless config.json says otherwise

    def tied(self, hf: Mapping[str, Any]) -> bool:
        """Whether the head is the embedding (transformers' `tie_word_embeddings`)."""
        return bool(hf.get("tie_word_embeddings", self.tied_by_default))


def _section(hf: Mapping[str, Any], source: str) -> Section:
    """The language model's config.json, read key by key with the kind of value each key must hold."""
    return Section(hf, source, "language model")


def _no_rope_scaling(hf: Mapping[str, Any], source: str) -> None:
    scaling = hf.get("rope_scaling")
    if scaling:
        raise _fail(source, f"rope_scaling={scaling!r} is not supported", "only the plain rotary embedding is")


# ------------------------------------------------------------------------------------------------------- LLaMA


def _llama_fields(hf: Mapping[str, Any], source: str) -> dict[str, Any]:
    c = _section(hf, source)
    heads = c.get("num_attention_heads", REQUIRED, "count")
    kv_heads = heads if hf.get("num_key_value_heads") is None else c.get("num_key_value_heads", REQUIRED, "count")
    if heads % kv_heads:
        raise _fail(source, f"num_key_value_heads={kv_heads} does not divide num_attention_heads={heads}",
                    "the config.json is inconsistent")
    if c.get("mlp_bias", False, "flag"):
        raise _fail(source, "mlp_bias=true is not supported", "LLaMA MLPs without biases only")
    return dict(width=c.get("hidden_size", REQUIRED, "count"), layers=c.get("num_hidden_layers", REQUIRED, "count"),
                heads=heads, kv_heads=0 if kv_heads == heads else kv_heads, **llama_rope_fields(c),
                mlp_width=c.get("intermediate_size", REQUIRED, "count"), act=c.activation("silu"),
                rms_norm_eps=float(c.get("rms_norm_eps", 1e-6, "positive")),
                max_positions=c.get("max_position_embeddings", 2048, "count"), norm="rms", positions="rope",
                mlp="swiglu", attn_bias=bool(c.get("attention_bias", False, "flag")))


def _llama_layer(get: Get, has: Has, prefix: str, heads: int) -> dict[str, torch.Tensor]:
    out = {f"attn.{p}.weight": get(f"{prefix}self_attn.{p}_proj.weight") for p in "qkvo"}
    out.update({f"attn.{p}.bias": get(f"{prefix}self_attn.{p}_proj.bias") for p in "qkvo"
                if has(f"{prefix}self_attn.{p}_proj.bias")})
    out.update({f"mlp.{p}.weight": get(f"{prefix}mlp.{p}_proj.weight") for p in ("gate", "up", "down")})
    out["attn_norm.weight"] = get(f"{prefix}input_layernorm.weight")
    out["mlp_norm.weight"] = get(f"{prefix}post_attention_layernorm.weight")
    return out


LLAMA = LanguageModel(
    name="llama", layers_path="model.layers", embedding="model.embed_tokens.weight", head="lm_head.weight",
    decoder_fields=_llama_fields, layer_weights=_llama_layer, final_norm=("model.norm.weight",),
    unused=(r".*\.rotary_emb\.inv_freq",),
)

# --------------------------------------------------------------------------------------------------------- MPT


def _mpt_fields(hf: Mapping[str, Any], source: str) -> dict[str, Any]:
    """transformers' `MptConfig` / mosaicml's MPTConfig (mpt-7b) and the older MosaicGPT config (mpt-1b-redpajama:
    flat `alibi`, `alibi_bias_max`, `attn_qk_ln` keys, `mlp_ratio`; q/k LayerNorm over the full width)."""
    attn = dict(hf.get("attn_config") or {})
    for key in ("alibi", "alibi_bias_max", "qk_ln", "clip_qkv", "softmax_scale"):  # MosaicGPT: flat attn_* keys
        if f"attn_{key}" in hf:
            attn.setdefault(key, hf[f"attn_{key}"])
        elif key in ("alibi", "alibi_bias_max") and key in hf:
            attn.setdefault(key, hf[key])
    if not attn.get("alibi", False):
        raise _fail(source, "alibi is off (learned position embeddings)", "only MPT models with ALiBi are supported")
    for key in ("clip_qkv", "softmax_scale", "prefix_lm"):
        if attn.get(key):
            raise _fail(source, f"attention setting {key}={attn[key]!r} is not supported",
                        "the released MPT language models use none of them")
    if hf.get("logit_scale") is not None:
        raise _fail(source, f"logit_scale={hf['logit_scale']!r} is not supported", "use an MPT without it")
    c = _section(hf, source)
    width = c.get("d_model", REQUIRED, "count")
    ratio = c.get("expansion_ratio", c.get("mlp_ratio", 4, "positive"), "positive")
    ffn = c.nested("ffn_config")
    if ffn.data.get("ffn_type", "mptmlp") != "mptmlp":
        raise _fail(source, f"ffn_type={ffn.data['ffn_type']!r} is not supported", "only MPT's plain GELU MLP is")
    biased = not c.get("no_bias", False, "flag")
    alibi_bias_max = Section(attn, source, "language model", "attn_config.").get("alibi_bias_max", 8, "positive")
    return dict(width=width, layers=c.get("n_layers", REQUIRED, "count"), heads=c.get("n_heads", REQUIRED, "count"),
                mlp_width=int(ratio * width), act="gelu",
                rms_norm_eps=float(c.get("layer_norm_epsilon", 1e-5, "positive")),
                max_positions=c.get("max_seq_len", 2048, "count"), norm="layer", norm_bias=biased,
                positions="alibi", alibi_bias_max=float(alibi_bias_max), attn_bias=biased,
                qk_norm=bool(attn.get("qk_ln", False)), mlp="mlp", mlp_bias=biased)


def _mpt_layer_names(norm1: str, norm2: str, up: str, down: str):
    def layer(get: Get, has: Has, prefix: str, heads: int) -> dict[str, torch.Tensor]:
        out = {}
        for kind in ("weight", "bias"):
            if not has(f"{prefix}attn.Wqkv.{kind}"):
                continue
            q, k, v = get(f"{prefix}attn.Wqkv.{kind}").chunk(3, dim=0)  # [3D, ...] = q, k, v
            out.update({f"attn.q.{kind}": q, f"attn.k.{kind}": k, f"attn.v.{kind}": v})
        for ours, theirs in (("attn.o", "attn.out_proj"), ("attn_norm", norm1), ("mlp_norm", norm2),
                             ("mlp.up", up), ("mlp.down", down), ("attn.q_norm", "attn.q_ln"),
                             ("attn.k_norm", "attn.k_ln")):
            if theirs.endswith("_ln") and not has(f"{prefix}{theirs}.weight"):
                continue  # qk_ln off: the model has no such norm, and a missing one is reported as missing
            out[f"{ours}.weight"] = get(f"{prefix}{theirs}.weight")
            if has(f"{prefix}{theirs}.bias"):
                out[f"{ours}.bias"] = get(f"{prefix}{theirs}.bias")
        return out

    return layer


MPT = LanguageModel(
    name="mpt", layers_path="transformer.blocks", embedding="transformer.wte.weight", head="lm_head.weight",
    decoder_fields=_mpt_fields, layer_weights=_mpt_layer_names("norm_1", "norm_2", "ffn.up_proj", "ffn.down_proj"),
    final_norm=("transformer.norm_f.weight", "transformer.norm_f.bias"), tied_by_default=True,
)
MOSAIC_GPT = LanguageModel(
    name="mpt", layers_path="transformer.blocks", embedding="transformer.wte.weight", head="lm_head.weight",
    decoder_fields=_mpt_fields, layer_weights=_mpt_layer_names("ln_1", "ln_2", "mlp.mlp_up", "mlp.mlp_down"),
    final_norm=("transformer.ln_f.weight", "transformer.ln_f.bias"), tied_by_default=True,
)

# ---------------------------------------------------------------------------------------------------- GPT-NeoX


def _gpt_neox_fields(hf: Mapping[str, Any], source: str) -> dict[str, Any]:
    """transformers 4.x keys (`rotary_pct`, `rotary_emb_base`) or 5.x ones (`rope_parameters`)."""
    _no_rope_scaling(hf, source)
    c = _section(hf, source)
    rope = c.nested("rope_parameters")
    if rope.data.get("rope_type", "default") != "default":
        raise _fail(source, f"rope_type={rope.data['rope_type']!r} is not supported",
                    "only the plain rotary embedding is")
    width, heads = c.get("hidden_size", REQUIRED, "count"), c.get("num_attention_heads", REQUIRED, "count")
    fraction = rope.get("partial_rotary_factor", c.get("rotary_pct", 1.0, "positive"), "positive")
    theta = rope.get("rope_theta", c.get("rotary_emb_base", 10000.0, "positive"), "positive")
    return dict(width=width, layers=c.get("num_hidden_layers", REQUIRED, "count"), heads=heads,
                mlp_width=c.get("intermediate_size", REQUIRED, "count"), act=c.activation("gelu"),
                rms_norm_eps=float(c.get("layer_norm_eps", 1e-5, "positive")), rope_theta=float(theta),
                rotary_dim=int(width // heads * fraction),
                max_positions=c.get("max_position_embeddings", 2048, "count"),
                norm="layer", positions="rope", attn_bias=bool(c.get("attention_bias", True, "flag")), mlp="mlp",
                mlp_bias=True, parallel_residual=bool(c.get("use_parallel_residual", True, "flag")))


def _gpt_neox_layer(get: Get, has: Has, prefix: str, heads: int) -> dict[str, torch.Tensor]:
    out = {}
    for kind in ("weight", "bias"):
        if not has(f"{prefix}attention.query_key_value.{kind}"):
            continue
        fused = get(f"{prefix}attention.query_key_value.{kind}")  # [H * 3 * Dh, ...]: per head q, k, v
        per_head = fused.reshape(heads, 3, fused.shape[0] // (3 * heads), *fused.shape[1:])
        for index, name in enumerate("qkv"):
            out[f"attn.{name}.{kind}"] = per_head[:, index].reshape(-1, *fused.shape[1:])
    for ours, theirs in (("attn.o", "attention.dense"), ("attn_norm", "input_layernorm"),
                         ("mlp_norm", "post_attention_layernorm"), ("mlp.up", "mlp.dense_h_to_4h"),
                         ("mlp.down", "mlp.dense_4h_to_h")):
        for kind in ("weight", "bias"):
            if has(f"{prefix}{theirs}.{kind}"):
                out[f"{ours}.{kind}"] = get(f"{prefix}{theirs}.{kind}")
    return out


GPT_NEOX = LanguageModel(
    name="gpt_neox", layers_path="gpt_neox.layers", embedding="gpt_neox.embed_in.weight", head="embed_out.weight",
    decoder_fields=_gpt_neox_fields, layer_weights=_gpt_neox_layer,
    final_norm=("gpt_neox.final_layer_norm.weight", "gpt_neox.final_layer_norm.bias"),
    unused=(r".*\.attention\.(bias|masked_bias)", r".*\.rotary_emb\.inv_freq"),
)

# model_type in the LM's config.json -> family
LANGUAGE_MODELS: dict[str, LanguageModel] = {
    "llama": LLAMA, "mpt": MPT, "mosaic_gpt": MOSAIC_GPT, "gpt_neox": GPT_NEOX,
}


def language_model(hf: Mapping[str, Any], source: str) -> LanguageModel:
    """The family of an LM config.json.

    Raises:
        CheckpointError: a model_type we do not convert.
    """
    model_type = hf.get("model_type")
    if model_type not in LANGUAGE_MODELS:
        raise _fail(source, f"model_type {model_type!r} is not a language model OpenFlamingo is converted with",
                    f"supported: {sorted(LANGUAGE_MODELS)}")
    return LANGUAGE_MODELS[model_type]


def is_unused(spec: LanguageModel, name: str) -> bool:
    """A stored tensor that the LM's forward never reads."""
    return any(re.fullmatch(pattern, name) for pattern in spec.unused)


def resize_rows(table: torch.Tensor, rows: int, what: str, source: str) -> torch.Tensor:
    """`resize_token_embeddings(rows)` for a table that has no new rows to add: keep the first `rows` (what
    transformers does when the tokenizer is shorter than the padded vocabulary, e.g. MPT's 50432 rows).

    Raises:
        CheckpointError: the table is shorter: the added tokens' rows were trained and must come from the checkpoint.
    """
    if table.shape[0] < rows:
        raise _fail(source, f"the {what} has {table.shape[0]} rows but the tokenizer with OpenFlamingo's tokens has "
                    f"{rows}", "the rows of <|endofchunk|>/<image> are in the OpenFlamingo checkpoint; pass the "
                    "checkpoint that was trained with this language model")
    return table[:rows]


def pad_head_rows(head: torch.Tensor, rows: int, source: str) -> torch.Tensor:
    """An untied LM head without rows for OpenFlamingo's added tokens gets zero rows for them.

    open_flamingo's `filter_state_dict_to_trainable` keeps parameters that are trainable or named "embed": an untied
    head called `lm_head` (LLaMA) is neither, so a checkpoint trained on LLaMA lacks these rows, and open_flamingo
    leaves them at `resize_token_embeddings`' random initialisation (N(0, 0.02)) at every load. Zero rows are that
    initialisation's mean: the added tokens get logit 0 instead of a small random one.
    """
    if head.shape[0] >= rows:
        return head
    logger.warning("%s: the LM head has %d rows, the tokenizer %d: the rows of OpenFlamingo's added tokens are not "
                   "in the checkpoint (open_flamingo leaves them randomly initialised); using zero rows",
                   source, head.shape[0], rows)
    return torch.cat([head, head.new_zeros(rows - head.shape[0], head.shape[1])])


def lm_weights(get: Get, has: Has, spec: LanguageModel, config: DecoderConfig, *, tied: bool,
               source: str) -> dict[str, torch.Tensor]:
    """The LM's tensors in our names (`decoder.*` except the gated blocks), the embedding and head cut or checked
    to `config.total_vocab_size` rows. A tied head is the embedding (a stored copy is read and ignored: after
    OpenFlamingo resized the embedding, only the embedding is current)."""
    rows = config.total_vocab_size
    embed = resize_rows(get(spec.embedding), rows, "input embedding", source)
    stored_head = get(spec.head) if spec.head and has(spec.head) else None
    if stored_head is None and not tied:
        raise _fail(source, f"missing tensor {spec.head!r} (the LM head; config.json says it is not tied)",
                    "the language model folder is incomplete")
    head = embed.clone() if tied else pad_head_rows(stored_head, rows, source)  # a copy: each tensor stored once
    out = {"decoder.embed.weight": embed, "decoder.lm_head.weight": resize_rows(head, rows, "LM head", source)}
    for i in range(config.layers):
        layer = spec.layer_weights(get, has, f"{spec.layers_path}.{i}.", config.heads)
        out.update({f"decoder.layers.{i}.{name}": tensor for name, tensor in layer.items()})
    for name, kind in zip(spec.final_norm, ("weight", "bias")):
        if has(name):
            out[f"decoder.norm.{kind}"] = get(name)
    return out
