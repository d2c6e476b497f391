"""The whole Flamingo model: vision encoder -> Perceiver Resampler -> decoder with gated cross-attention.

Each graph of the contract (DESIGN.md) is one sub-module call with explicit inputs and no state between calls:

    pixel_values [N,3,H,W] --vision--> image_features [N,T,Dv] --resampler--> visual_tokens [N,L,Dv]
        --xattn_kv (project_visual of every gated block)--> cross_key.i / cross_value.i [N,H,L,Dh]
    input_ids, attention_mask, past K/V, cross K/V of the row's images, image_attention_mask
        --decoder--> logits [B,S,V], present K/V

`forward` chains them for a whole prompt the way transformers' `IdeficsForVisionText2Text.forward` does (same
inputs, same logits), which is what the parity tests compare.

A tiled vision tower (mllama, `config.tiled`) takes each image as T tiles with its aspect-ratio id and tile mask, and
a projector takes the resampler's place: visual_tokens [N, T*P, D] whose T tiles are T slots of P tokens for the
decoder's `image_attention_mask` [B, S, M*T] (graphs.py).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flamingo_edge.config import FlamingoConfig
from flamingo_edge.models.decoder import Decoder
from flamingo_edge.models.mllama_vision import MllamaProjector, MllamaVision
from flamingo_edge.models.resampler import PerceiverResampler
from flamingo_edge.models.vision import VisionEncoder


def images_to_rows(per_image, batch: int) -> Tensor:
    """Cross K/V per image [B*M, H, L, Dh] -> per row [B, H, M*L, Dh] (image-major within the row)."""
    n, heads, tokens, head_dim = per_image.shape
    images = n // batch
    per_row = per_image.reshape(batch, images, heads, tokens, head_dim).transpose(1, 2)  # [B, H, M, L, Dh]
    return per_row.reshape(batch, heads, images * tokens, head_dim)  # [B, H, M*L, Dh]


class FlamingoModel(nn.Module):
    """Flamingo-style vision-language model (fp32 reference for every exported graph)."""

    def __init__(self, *, config: FlamingoConfig):
        super().__init__()
        self.config = config
        if config.tiled:
            self.vision = MllamaVision(settings=config.vision)
            self.resampler = MllamaProjector(settings=config.vision)
        else:
            self.vision = VisionEncoder(config=config.vision)
            self.resampler = PerceiverResampler(width=config.vision.width, config=config.resampler)
        self.decoder = Decoder(config=config.decoder, visual_width=config.visual_width)

    def encode_images(self, pixel_values: Tensor, aspect_ratio_ids: Tensor | None = None,
                      aspect_ratio_mask: Tensor | None = None) -> Tensor:
        """pixel_values [N, 3, H, W] -> visual_tokens [N, L, Dv] (single-frame images); a tiled tower: pixel_values
        [N, T, 3, S, S], aspect_ratio_ids [N], aspect_ratio_mask [N, T] -> visual_tokens [N, T*P, D]."""
        if self.config.tiled:
            return self.resampler(self.vision(pixel_values, aspect_ratio_ids, aspect_ratio_mask))
        return self.resampler(self.vision(pixel_values)[:, None])  # [N, 1, T, Dv] -> [N, L, Dv]

    def cross_attention_kv(self, visual_tokens: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """visual_tokens [N, L, Dv] -> per gated block, cross_key / cross_value [N, H, L, Dh]."""
        pairs = [block.project_visual(visual_tokens) for block in self.decoder.cross_blocks]
        return [key for key, _ in pairs], [value for _, value in pairs]

    def rows_cross_kv(self, pixel_values: Tensor, aspect_ratio_ids: Tensor | None = None,
                      aspect_ratio_mask: Tensor | None = None) -> tuple[list[Tensor], list[Tensor]]:
        """Every row's images [B, M, ...] (as `forward` takes them) -> per gated block, cross K/V [B, H, M*L, Dh].

        A tiled tower's batch with no image at all (every aspect_ratio_id 0: the processor's padding slots) gets zero
        K/V, so that its rows add exactly 0 (mllama skips its cross-attention layers then; with an image in the batch,
        the padding images are computed from their zero pixels, as upstream does).
        """
        batch = pixel_values.shape[0]
        tiles = (aspect_ratio_ids.flatten(0, 1), aspect_ratio_mask.flatten(0, 1)) if self.config.tiled else ()
        visual_tokens = self.encode_images(pixel_values.flatten(0, 1), *tiles)  # [B*M, L, Dv]
        keys, values = self.cross_attention_kv(visual_tokens)
        if self.config.tiled and not bool(aspect_ratio_ids.any()):
            keys, values = [torch.zeros_like(k) for k in keys], [torch.zeros_like(v) for v in values]
        return [images_to_rows(k, batch) for k in keys], [images_to_rows(v, batch) for v in values]  # [B,H,M*L,Dh]

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor, image_attention_mask: Tensor,
        aspect_ratio_ids: Tensor | None = None, aspect_ratio_mask: Tensor | None = None,
    ) -> Tensor:
        """A whole prompt, no cache.

        Args:
            input_ids: i64 [B, S].
            attention_mask: i64 [B, S].
            pixel_values: f32 [B, M, 3, H, W] (rows with fewer images carry zero images, masked out); a tiled tower:
                [B, M, T, 3, S, S].
            image_attention_mask: i64 [B, S, M]; a tiled tower: [B, S, M*T], one slot per tile.
            aspect_ratio_ids, aspect_ratio_mask: (a tiled tower) i64 [B, M] and [B, M, T].

        Returns:
            logits f32 [B, S, V].
        """
        batch = pixel_values.shape[0]
        keys, values = self.rows_cross_kv(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
        past_keys, past_values = self.decoder.empty_cache(batch, pixel_values.dtype)
        logits, _, _ = self.decoder(
            input_ids, attention_mask, past_keys, past_values, keys, values, image_attention_mask
        )
        return logits
