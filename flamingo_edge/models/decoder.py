"""The language decoder (the `decoder` graph): LM blocks with gated cross-attention blocks interleaved.

Mirrors transformers' `IdeficsModel` text path (models/idefics/modeling_idefics.py): RMSNorm, rotary embeddings,
SwiGLU, a gated cross-attention block *before* each decoder layer listed in `cross_layers`. The language models of
OpenFlamingo differ by switches of `DecoderConfig` only: MPT (transformers' models/mpt/modeling_mpt.py, mosaicml's
llm-foundry) uses bias-free LayerNorm, ALiBi and a GELU MLP; GPT-NeoX (models/gpt_neox/modeling_gpt_neox.py) uses
LayerNorm, rotary embeddings on the first `rotary_dim` channels of each head, biased projections and a parallel
residual. Upstream's fused q/k/v projections are split into three at import time.

Departures from upstream, all for a stateless graph that TensorRT builds:
- past keys/values and the cross-attention keys/values are explicit inputs; P (past length) may be 0 and is never
  branched on, so prefill (S > 1, P = 0) and decode (S = 1) are one graph; the past is only read (attention over it
  and over the new tokens is joined at the scores), and only the new tokens' K/V come out: the runtime's static cache
  writes them in place, feeding its whole preallocated buffer as the past with the unused slots masked;
- positions come from `attention_mask` (like upstream's `cumsum(mask) - 1`) but are computed with a comparison and a
  sum, because TensorRT 8.5 has no CumSum;
- IDEFICS' decoupled embedding / LM head (base + additional vocabulary) are merged into one table at import time:
  a single Gather and a single MatMul, exactly equivalent to upstream's two lookups.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flamingo_edge.config import DecoderConfig
from flamingo_edge.models.gated_xattn import GatedCrossAttention, cross_attention_masks
from flamingo_edge.models.layers import (
    MASKED_SCORE,
    alibi_slopes,
    apply_rotary,
    attend_after_past,
    llama3_scaled_frequencies,
    make_mlp,
    make_norm,
    merge_heads,
    rotary_cos_sin,
    rotary_inverse_frequencies,
    split_heads,
)


def causal_mask_and_positions(attention_mask: Tensor, new_tokens: int) -> tuple[Tensor, Tensor]:
    """attention_mask [B, P+S] (1 = real token) -> allowed bool [B, 1, S, P+S] and positions i64 [B, S].

    Query j (absolute index P+j) may see key t when t <= P+j and key t is a real token. Its position is the number of
    real tokens up to and including it, minus 1 (upstream: cumsum - 1); padding queries get position 1 as upstream.
    """
    total = attention_mask.shape[1]
    query_index = torch.arange(new_tokens, device=attention_mask.device) + (total - new_tokens)  # [S]
    key_index = torch.arange(total, device=attention_mask.device)  # [P+S]
    causal = key_index[None, :] <= query_index[:, None]  # [S, P+S]
    real = attention_mask != 0  # [B, P+S]
    allowed = causal[None] & real[:, None, :]  # [B, S, P+S]
    positions = allowed.to(torch.int64).sum(-1) - 1  # [B, S]
    query_is_real = real[:, total - new_tokens :]  # [B, S]
    positions = torch.where(query_is_real, positions, torch.ones_like(positions))
    return allowed[:, None], positions  # [B, 1, S, P+S], [B, S]


def alibi_bias(slopes: Tensor, attention_mask: Tensor, new_tokens: int) -> Tensor:
    """ALiBi's score bias [1, H, S, P+S]: -slope_h * (query slot - key slot).

    Slots are cache slots, as in MPT (transformers and llm-foundry add slope * key index, which the softmax makes the
    same): exact for left padding, a constant offset of every real key. The past's P slots may end in unused slots
    (masked, a static KV cache's room for later tokens): the new tokens go to the slot after the last one in use by
    any row, not to slot P, so that the distances do not count the unused slots.
    """
    total = attention_mask.shape[1]
    past = total - new_tokens
    key_index = torch.arange(total, device=slopes.device)  # [P+S]
    in_use = (attention_mask[:, :past] != 0).to(torch.int64) * (key_index[:past] + 1)  # [B, P]: slot + 1 if real
    used = torch.cat((in_use.flatten(), torch.zeros(1, dtype=torch.int64, device=slopes.device))).max()  # scalar
    key_slot = torch.where(key_index < past, key_index, key_index - past + used)  # [P+S]
    query_slot = key_slot[past:]  # [S]
    distance = (query_slot[:, None] - key_slot[None, :]).to(slopes.dtype)  # [S, P+S]
    return (-slopes[:, None, None] * distance)[None]  # [1, H, S, P+S]


class SelfAttention(nn.Module):
    """Causal multi-head self-attention (rotary or ALiBi positions) with an explicit KV cache; grouped-query when
    the keys/values have fewer heads than the queries (`kv_heads`: each K/V head serves heads // kv_heads queries)."""

    def __init__(self, *, config: DecoderConfig):
        super().__init__()
        self.heads, self.head_dim, self.kv_heads = config.heads, config.head_dim, config.kv_head_count
        # rotated channels per head, all of them unless partial (Python ints, so tracing sees no branch)
        self.rotary_channels = config.rotary_dim if 0 < config.rotary_dim < config.head_dim else config.head_dim
        self.q = nn.Linear(config.width, config.width, bias=config.attn_bias)
        kv_width = self.kv_heads * self.head_dim
        self.k = nn.Linear(config.width, kv_width, bias=config.attn_bias)
        self.v = nn.Linear(config.width, kv_width, bias=config.attn_bias)
        self.o = nn.Linear(config.width, config.width, bias=config.attn_bias)
        norm = dict(dim=config.width, eps=config.rms_norm_eps, bias=config.norm_bias)
        self.q_norm = make_norm(config.norm, **norm) if config.qk_norm else None
        self.k_norm = make_norm(config.norm, **norm) if config.qk_norm else None

    def forward(
        self, x: Tensor, rotary: tuple[Tensor, ...], score_bias: Tensor, past_key: Tensor, past_value: Tensor,
        past_length: int | Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, S, D], past [B, Hkv, P, Dh] -> output [B, S, D], the new tokens' key/value [B, Hkv, S, Dh].

        `rotary` is (cos, sin) for rotary embeddings, or () (ALiBi: its bias is in `score_bias`). `score_bias`
        [B, 1 or Hkv, G*S, P+S] is added to the scores: the causal/padding mask (0 or MASKED_SCORE) and ALiBi, summed
        once per forward (`grouped_bias`; G = H / Hkv, 1 without grouped-query attention). The past is only read,
        never copied, nor repeated per query head: the G query heads of a K/V head attend as G*S rows of one head.
        `past_length` is P, read once by the caller for every layer (None: from `past_key`).
        """
        q, k = self.q(x), self.k(x)  # [B, S, D]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = split_heads(q, self.heads, self.head_dim)  # [B, H, S, Dh]
        k, v = (split_heads(t, self.kv_heads, self.head_dim) for t in (k, self.v(x)))  # [B, Hkv, S, Dh]
        if rotary:
            q, k = (apply_rotary(t, *rotary, self.rotary_channels, self.head_dim) for t in (q, k))
        if self.kv_heads != self.heads:  # [B, H, S, Dh] -> [B, Hkv, G*S, Dh]: head h = kv head h // G
            q = q.reshape(q.shape[0], self.kv_heads, -1, self.head_dim)
        attended = attend_after_past(q, past_key, past_value, k, v, self.head_dim, None, score_bias, past_length)
        if self.kv_heads != self.heads:
            attended = attended.reshape(attended.shape[0], self.heads, -1, self.head_dim)  # [B, H, S, Dh]
        return self.o(merge_heads(attended, self.heads * self.head_dim)), k, v


class DecoderLayer(nn.Module):
    """Pre-norm block: self-attention and MLP, each residual, one after the other or in parallel (GPT-NeoX)."""

    def __init__(self, *, config: DecoderConfig):
        super().__init__()
        self.parallel = config.parallel_residual
        norm = dict(dim=config.width, eps=config.rms_norm_eps, bias=config.norm_bias)
        self.attn_norm = make_norm(config.norm, **norm)
        self.attn = SelfAttention(config=config)
        self.mlp_norm = make_norm(config.norm, **norm)
        self.mlp = make_mlp(config.mlp, dim=config.width, hidden=config.mlp_width, act=config.act,
                            bias=config.mlp_bias)

    def forward(self, x, rotary, score_bias, past_key, past_value, past_length=None):
        attended, key, value = self.attn(self.attn_norm(x), rotary, score_bias, past_key, past_value, past_length)
        if self.parallel:
            return x + attended + self.mlp(self.mlp_norm(x)), key, value
        x = x + attended
        return x + self.mlp(self.mlp_norm(x)), key, value


class Decoder(nn.Module):
    """Token ids + caches -> logits and the new tokens' self-attention K/V (see the `decoder` graph contract)."""

    def __init__(self, *, config: DecoderConfig, visual_width: int):
        super().__init__()
        self.config = config
        # input-only rows (mllama's <|image|> and its 7 spares) are read, never predicted: the head has none
        self.embed = nn.Embedding(config.total_vocab_size + config.input_only_vocab, config.width)
        # the self-attention layers; with cross_placement "replace", the gated blocks stand in the others' places
        self.layers = nn.ModuleList(DecoderLayer(config=config) for _ in range(config.self_attention_layers))
        self.cross_blocks = nn.ModuleList(
            GatedCrossAttention(config=config, visual_width=visual_width) for _ in config.cross_layers
        )
        self.norm = make_norm(config.norm, dim=config.width, eps=config.rms_norm_eps, bias=config.norm_bias)
        self.lm_head = nn.Linear(config.width, config.total_vocab_size, bias=False)
        inverse_frequencies = rotary_inverse_frequencies(head_dim=config.rotary_channels, theta=config.rope_theta)
        if config.rope_type == "llama3":
            inverse_frequencies = llama3_scaled_frequencies(
                inverse_frequencies, factor=config.rope_factor, low_freq_factor=config.rope_low_freq_factor,
                high_freq_factor=config.rope_high_freq_factor,
                original_max_positions=config.rope_original_max_positions)
        self.register_buffer("inverse_frequencies", inverse_frequencies, persistent=False)
        slopes = alibi_slopes(heads=config.heads, bias_max=config.alibi_bias_max)
        self.register_buffer("alibi_slopes", slopes, persistent=False)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        past_keys: list[Tensor],
        past_values: list[Tensor],
        cross_keys: list[Tensor],
        cross_values: list[Tensor],
        image_attention_mask: Tensor,
    ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """Run S new tokens after P cached ones.

        Args:
            input_ids: i64 [B, S].
            attention_mask: i64 [B, P+S], 1 for real tokens, 0 for padding and for unused past slots.
            past_keys, past_values: one f32 [B, Hkv, P, Dh] per decoder layer (P may be 0). Slots after the cached
                tokens may be unused room (a static cache fed whole), masked by `attention_mask`.
            cross_keys, cross_values: one f32 [B, H, M*L, Dh] per gated block (from `project_visual`).
            image_attention_mask: i64 [B, S, M], 1 where token s may attend to image m.

        Returns:
            logits [B, S, V] and the new tokens' keys/values, one [B, Hkv, S, Dh] per decoder layer: the caller
            writes them into its cache (`append_kv` for a growing torch cache).
        """
        new_tokens = input_ids.shape[1]
        allowed, positions = causal_mask_and_positions(attention_mask, new_tokens)
        # One additive term for every layer's scores, computed once: an Add per layer instead of a Where (ONNX
        # Runtime's broadcasting Where cost a tenth of a 1024-token prefill). A key that is not allowed gets
        # MASKED_SCORE added, which underflows its softmax weight to exactly 0 as the fill did; only rows with no
        # allowed key at all (left-padding queries, whose outputs nothing reads) come out differently.
        score_bias = torch.where(allowed, 0.0, MASKED_SCORE)  # [B, 1, S, P+S]
        if self.config.positions == "alibi":
            score_bias = score_bias + alibi_bias(self.alibi_slopes, attention_mask, new_tokens)  # [B, H, S, P+S]
            position_terms = ()
        else:
            position_terms = rotary_cos_sin(positions, self.inverse_frequencies)
        score_bias = grouped_bias(score_bias, self.config.heads, self.config.kv_head_count,
                                  per_head=self.config.positions == "alibi")
        cross_index = {layer: i for i, layer in enumerate(self.config.cross_layers)}
        x = self.embed(input_ids)  # [B, S, D]
        # every gated block attends over the same M*L visual tokens: their masks are computed once
        masks = cross_attention_masks(image_attention_mask, cross_keys[0].shape[2], x.dtype,
                                      empty_rows=self.config.cross_empty_rows) if cross_index else None
        new_keys, new_values = [], []
        past_length = past_keys[0].shape[2]  # P, one Shape in the graph for every layer's split of its weights
        replace, self_layers = self.config.cross_placement == "replace", iter(enumerate(self.layers))
        for index in range(self.config.layers):
            if index in cross_index:
                block = cross_index[index]
                x = self.cross_blocks[block](x, cross_keys[block], cross_values[block], image_attention_mask, masks)
                if replace:
                    continue
            cached, layer = next(self_layers)  # its K/V: past_key.{cached}
            x, key, value = layer(x, position_terms, score_bias, past_keys[cached], past_values[cached], past_length)
            new_keys.append(key)
            new_values.append(value)
        return self.lm_head(self.norm(x)), new_keys, new_values

    def empty_cache(self, batch: int, dtype: torch.dtype = torch.float32) -> tuple[list[Tensor], list[Tensor]]:
        """P = 0 past keys/values for a prefill: one [B, Hkv, 0, Dh] per layer."""
        shape = (batch, self.config.kv_head_count, 0, self.config.head_dim)
        empty = [torch.zeros(shape, dtype=dtype, device=self.embed.weight.device) for _ in self.layers]
        return empty, list(empty)


def grouped_bias(bias: Tensor, heads: int, kv_heads: int, *, per_head: bool) -> Tensor:
    """A score bias [B, 1, S, T] (or [B, H, S, T] when `per_head`: ALiBi) as grouped-query attention adds it,
    [B, 1 or Hkv, G*S, T] (G = H / Hkv): the S rows repeated for each of the G query heads that share a K/V head.
    Unchanged without grouping."""
    if kv_heads == heads:
        return bias
    if per_head:
        return bias.reshape(bias.shape[0], kv_heads, -1, bias.shape[-1])  # [B, Hkv, G*S, T]
    return bias.repeat(1, 1, heads // kv_heads, 1)  # [B, 1, G*S, T], the rows of query head g at g*S..g*S+S-1


def append_kv(past: list[Tensor], new: list[Tensor]) -> list[Tensor]:
    """A growing torch cache (the reference's): each layer's past [B, H, P, Dh] extended by its new [B, H, S, Dh]."""
    return [torch.cat((old, added), dim=2) for old, added in zip(past, new)]
