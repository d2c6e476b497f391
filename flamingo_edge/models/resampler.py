"""The Perceiver Resampler (the `resampler` graph): every image becomes L visual tokens.

Mirrors transformers' `models/idefics/perceiver.py` (and open_flamingo's `PerceiverResampler`, src/helpers.py):
learned latents are the queries; keys and values come from the image features *concatenated with the latents*
(Flamingo paper, sec. 2.1 / fig. 5). Written with MatMul instead of the upstream ellipsis einsum, which TensorRT's
ONNX parser rejects.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flamingo_edge.config import ResamplerConfig
from flamingo_edge.models.layers import ACTIVATIONS, attend, merge_heads, split_heads


class PerceiverAttention(nn.Module):
    """Latents attend to [media; latents]; LayerNorm on both streams, optional q/k LayerNorm per head."""

    def __init__(self, *, width: int, config: ResamplerConfig):
        super().__init__()
        inner = config.heads * config.head_dim
        self.heads, self.head_dim = config.heads, config.head_dim
        self.media_norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.latents_norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.q = nn.Linear(width, inner, bias=False)
        self.k = nn.Linear(width, inner, bias=False)
        self.v = nn.Linear(width, inner, bias=False)
        self.out = nn.Linear(inner, width, bias=False)
        self.q_norm = nn.LayerNorm(config.head_dim) if config.qk_layer_norms else None
        self.k_norm = nn.LayerNorm(config.head_dim) if config.qk_layer_norms else None

    def forward(self, media: Tensor, latents: Tensor) -> Tensor:
        # media [N, F*T, Dv], latents [N, L, Dv]
        media, latents = self.media_norm(media), self.latents_norm(latents)
        context = torch.cat([media, latents], dim=1)  # [N, F*T+L, Dv]
        q = split_heads(self.q(latents), self.heads, self.head_dim)  # [N, H, L, Dh]
        k = split_heads(self.k(context), self.heads, self.head_dim)  # [N, H, F*T+L, Dh]
        v = split_heads(self.v(context), self.heads, self.head_dim)  # [N, H, F*T+L, Dh]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        # Upstream subtracts the row max before softmax; softmax already does, so the result is the same.
        return self.out(merge_heads(attend(q, k, v, self.head_dim), self.heads * self.head_dim))  # [N, L, Dv]


class PerceiverMLP(nn.Module):
    """LayerNorm -> Linear -> activation -> Linear, no biases."""

    def __init__(self, *, width: int, config: ResamplerConfig):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.fc = nn.Linear(width, config.mlp_width, bias=False)
        self.proj = nn.Linear(config.mlp_width, width, bias=False)
        self.act = ACTIVATIONS[config.act]

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.act(self.fc(self.norm(x))))


class PerceiverBlock(nn.Module):
    """Residual attention then residual MLP on the latents."""

    def __init__(self, *, width: int, config: ResamplerConfig):
        super().__init__()
        self.attn = PerceiverAttention(width=width, config=config)
        self.mlp = PerceiverMLP(width=width, config=config)

    def forward(self, media: Tensor, latents: Tensor) -> Tensor:
        latents = latents + self.attn(media, latents)
        return latents + self.mlp(latents)


class PerceiverResampler(nn.Module):
    """image_features [N, F, T, Dv] (F frames per image) -> visual_tokens [N, L, Dv].

    With `config.enabled` False (IDEFICS `use_resampler=False`) the visual tokens are the F*T features unchanged.
    """

    def __init__(self, *, width: int, config: ResamplerConfig):
        super().__init__()
        self.config = config
        if not config.enabled:
            return
        self.latents = nn.Parameter(torch.zeros(config.latents, width))
        # OpenFlamingo's frame_embs: a learned embedding per frame index, added to every token of that frame.
        self.frame_embeddings = nn.Parameter(torch.zeros(config.max_frames, width)) if config.max_frames else None
        self.blocks = nn.ModuleList(PerceiverBlock(width=width, config=config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(width, eps=config.layer_norm_eps)

    def forward(self, image_features: Tensor) -> Tensor:
        n, frames, tokens, width = image_features.shape
        if not self.config.enabled:
            return image_features.reshape(n, frames * tokens, width)  # [N, F*T, Dv]
        if self.frame_embeddings is not None:
            image_features = image_features + self.frame_embeddings[:frames, None, :]  # [N, F, T, Dv]
        media = image_features.reshape(n, frames * tokens, width)  # [N, F*T, Dv]
        latents = self.latents.expand(n, -1, -1)  # [N, L, Dv]
        for block in self.blocks:
            latents = block(media, latents)
        return self.norm(latents)
