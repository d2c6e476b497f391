"""The vision encoder: a CLIP-style ViT (the `vision` graph).

Mirrors transformers' `models/idefics/vision.py` (a copy of CLIPVisionTransformer). Where IDEFICS departs from CLIP
we follow IDEFICS: the output is every token of the last block, class token included and without `post_layernorm`
(IDEFICS feeds `last_hidden_state`, and applies the post-norm to the pooled class token only, which it never uses).
open_clip's `VisionTransformer` (OpenFlamingo's vision encoder) is the same network; OpenFlamingo takes its patch
tokens only (`output_tokens=True`, open_clip 2.20: `x[:, 1:]` before `ln_post`), which `output_class_token=False`
selects.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flamingo_edge.config import VisionConfig
from flamingo_edge.models.layers import ACTIVATIONS, attend, merge_heads, split_heads


class VisionAttention(nn.Module):
    """Bidirectional multi-head self-attention with biased projections."""

    def __init__(self, *, width: int, heads: int):
        super().__init__()
        self.heads, self.head_dim, self.width = heads, width // heads, width
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        # x [N, T, Dv]
        q, k, v = (split_heads(proj(x), self.heads, self.head_dim) for proj in (self.q, self.k, self.v))  # [N,H,T,Dh]
        return self.out(merge_heads(attend(q, k, v, self.head_dim), self.width))  # [N, T, Dv]


class VisionMLP(nn.Module):
    """fc1 -> activation -> fc2."""

    def __init__(self, *, width: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.act = ACTIVATIONS[act]

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, *, config: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.attn = VisionAttention(width=config.width, heads=config.heads)
        self.norm2 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(width=config.width, hidden=config.mlp_width, act=config.act)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionEncoder(nn.Module):
    """CLIP ViT: pixel_values [N, 3, H, W] -> image_features [N, T, Dv], T = patches (+ the class token)."""

    def __init__(self, *, config: VisionConfig):
        super().__init__()
        self.config = config
        width = config.width
        self.patch_embed = nn.Conv2d(
            config.num_channels, width, kernel_size=config.patch_size, stride=config.patch_size, bias=False
        )
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.position_embedding = nn.Parameter(torch.zeros(config.num_positions, width))
        self.pre_norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.blocks = nn.ModuleList(VisionBlock(config=config) for _ in range(config.layers))

    def forward(self, pixel_values: Tensor) -> Tensor:
        patches = self.patch_embed(pixel_values)  # [N, Dv, H/P, W/P]
        patches = patches.flatten(2).transpose(1, 2)  # [N, T-1, Dv]
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)  # [N, 1, Dv]
        x = torch.cat([cls, patches], dim=1) + self.position_embedding  # [N, T, Dv]
        x = self.pre_norm(x)
        for block in self.blocks:
            x = block(x)
        return x if self.config.output_class_token else x[:, 1:]  # [N, T, Dv]
