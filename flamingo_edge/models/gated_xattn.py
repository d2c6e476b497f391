"""Gated cross-attention dense blocks: text queries attend to the visual tokens of their image.

Mirrors transformers' `IdeficsGatedCrossAttentionLayer` (models/idefics/modeling_idefics.py), which follows the
Flamingo paper (sec. 2.2, fig. 4): x = x + tanh(a_attn) * xattn(x, visual); x = x + tanh(a_ff) * ffw(x), with the
gates starting at 0 so that the frozen LM is untouched at initialisation.

OpenFlamingo's `GatedCrossAttentionBlock` (open_flamingo src/helpers.py) is the same block with other switches of
`DecoderConfig`: LayerNorm instead of RMSNorm, a GELU MLP of width 4 D instead of SwiGLU, 8 heads of 64 whatever
the LM width, scalar gates. Its "attend to the latest image at or before the token" rule is data: the processor
builds `image_attention_mask` that way.

The block is split along the graph contract: `project_visual` is the per-image half (the `xattn_kv` graph, computed
once per image and cached), `forward` is the per-token half inside the `decoder` graph.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flamingo_edge.config import DecoderConfig
from flamingo_edge.models.layers import RMSNorm, attend, make_mlp, make_norm, merge_heads, split_heads


def expand_image_mask(image_mask: Tensor, tokens_per_image: int) -> Tensor:
    """image_attention_mask [B, S, M] (1 = row may attend to image m) -> bool [B, 1, S, M*L] over visual tokens."""
    batch, length, images = image_mask.shape
    allowed = image_mask[..., None].expand(batch, length, images, tokens_per_image)  # [B, S, M, L]
    return allowed.reshape(batch, 1, length, images * tokens_per_image) != 0  # [B, 1, S, M*L]


def cross_attention_masks(image_mask: Tensor, visual_tokens: int, dtype: torch.dtype, *,
                          empty_rows: str = "zero") -> tuple[Tensor, Tensor]:
    """image_mask [B, S, M] and the M*L visual tokens -> which tokens each row may attend to (bool [B, 1, S, M*L]) and
    the row gate ([B, S, 1], 0 for a row with no image). With `empty_rows` "zero" such a row must contribute exactly
    0: it is gated, never left to a softmax over a fully masked row. With "attend_all" (mllama) it may attend to every
    visual token."""
    allowed = expand_image_mask(image_mask, visual_tokens // image_mask.shape[-1])  # [B, 1, S, M*L]
    row_gate = (image_mask != 0).any(dim=-1, keepdim=True)  # [B, S, 1]
    if empty_rows == "attend_all":
        allowed = allowed | ~row_gate[:, None]  # [B, 1, S, M*L]
    return allowed, row_gate.to(dtype)


class GatedCrossAttention(nn.Module):
    """Gated cross-attention dense block: norm, cross-attention, tanh gate; norm, MLP, tanh gate (optional q/k
    RMSNorm; grouped-query when the keys/values have fewer heads, `cross_kv_heads`)."""

    def __init__(self, *, config: DecoderConfig, visual_width: int):
        super().__init__()
        inner = config.cross_heads * config.cross_head_dim
        self.heads, self.head_dim, self.kv_heads = config.cross_heads, config.cross_head_dim, config.cross_kv_head_count
        self.empty_rows = config.cross_empty_rows
        norm_eps = config.cross_norm_eps or config.rms_norm_eps
        self.attn_norm = make_norm(config.cross_norm, dim=config.width, eps=norm_eps)
        self.q = nn.Linear(config.width, inner, bias=False)
        self.k = nn.Linear(visual_width, self.kv_heads * self.head_dim, bias=False)
        self.v = nn.Linear(visual_width, self.kv_heads * self.head_dim, bias=False)
        self.o = nn.Linear(inner, config.width, bias=False)
        norm_dim, eps = config.cross_head_dim, config.rms_norm_eps
        self.q_norm = RMSNorm(dim=norm_dim, eps=eps) if config.cross_qk_norms else None
        self.k_norm = RMSNorm(dim=norm_dim, eps=eps) if config.cross_qk_norms else None
        self.mlp_norm = make_norm(config.cross_norm, dim=config.width, eps=norm_eps)
        self.mlp = make_mlp(config.cross_mlp, dim=config.width, hidden=config.cross_mlp_width or config.mlp_width,
                            act=config.cross_act or config.act)
        gate_shape = (config.width,) if config.vector_gates else (1,)
        self.attn_gate = nn.Parameter(torch.zeros(gate_shape))
        self.mlp_gate = nn.Parameter(torch.zeros(gate_shape))

    def project_visual(self, visual_tokens: Tensor) -> tuple[Tensor, Tensor]:
        """visual_tokens [N, L, Dv] -> cross_key, cross_value [N, Hkv, L, Dh] (k already q/k-normed)."""
        key = split_heads(self.k(visual_tokens), self.kv_heads, self.head_dim)  # [N, Hkv, L, Dh]
        value = split_heads(self.v(visual_tokens), self.kv_heads, self.head_dim)  # [N, Hkv, L, Dh]
        if self.k_norm is not None:
            key = self.k_norm(key)
        return key, value

    def forward(self, hidden: Tensor, cross_key: Tensor, cross_value: Tensor, image_mask: Tensor,
                masks: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """hidden [B, S, D], cross_key/value [B, Hkv, M*L, Dh], image_mask [B, S, M] -> hidden [B, S, D]. `masks`:
        `cross_attention_masks` of these inputs, when the caller computed them once for every block."""
        allowed, row_gate = masks if masks is not None else cross_attention_masks(
            image_mask, cross_key.shape[2], hidden.dtype, empty_rows=self.empty_rows)
        q = split_heads(self.q(self.attn_norm(hidden)), self.heads, self.head_dim)  # [B, H, S, Dh]
        if self.q_norm is not None:
            q = self.q_norm(q)
        grouped = self.kv_heads != self.heads
        if grouped:  # [B, H, S, Dh] -> [B, Hkv, G*S, Dh], the mask's rows repeated for each of the G query heads
            q = q.reshape(q.shape[0], self.kv_heads, -1, self.head_dim)
            allowed = allowed.repeat(1, 1, self.heads // self.kv_heads, 1)
        attended = attend(q, cross_key, cross_value, self.head_dim, allowed)
        if grouped:
            attended = attended.reshape(attended.shape[0], self.heads, -1, self.head_dim)  # [B, H, S, Dh]
        attended = self.o(merge_heads(attended, self.heads * self.head_dim))  # [B, S, D]
        if self.empty_rows == "attend_all":  # mllama: the attention of an image-less row counts, its MLP does not
            hidden = hidden + torch.tanh(self.attn_gate) * attended
            return hidden + torch.tanh(self.mlp_gate) * (self.mlp(self.mlp_norm(hidden)) * row_gate)
        hidden = hidden + torch.tanh(self.attn_gate) * (attended * row_gate)
        return hidden + torch.tanh(self.mlp_gate) * self.mlp(self.mlp_norm(hidden))
