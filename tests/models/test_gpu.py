"""The reference model on a CUDA GPU: fp32 equals the CPU, fp16 keeps top-1 agreement (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from flamingo_edge.models import DecoderConfig, FlamingoConfig, FlamingoModel, ResamplerConfig, VisionConfig
from flamingo_edge.tolerances import FP16_TOP1_AGREEMENT, LOGITS_REL_TOL, relative_error

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]

CONFIG = FlamingoConfig(
    family="idefics",
    vision=VisionConfig(image_size=56, patch_size=14, width=64, layers=2, heads=4, mlp_width=128, act="gelu"),
    resampler=ResamplerConfig(enabled=True, latents=16, depth=2, heads=4, head_dim=16, mlp_width=256,
                              qk_layer_norms=True),
    decoder=DecoderConfig(vocab_size=500, additional_vocab_size=2, width=128, layers=4, heads=4, mlp_width=256,
                          cross_layers=(0, 2), cross_heads=4, cross_head_dim=32, cross_qk_norms=True),
)


def _model_and_inputs(seed: int):
    torch.manual_seed(seed)
    model = FlamingoModel(config=CONFIG).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():  # O(1) activations and non-zero gates
            param.copy_(torch.randn_like(param) / (param.shape[-1] ** 0.5 if param.ndim > 1 else 1.0))
    batch, length, images = 2, 48, 2
    ids = torch.randint(3, 500, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.int64)
    mask[1, :7] = 0
    image_mask = torch.zeros(batch, length, images, dtype=torch.int64)
    image_mask[:, 5:20, 0] = 1
    image_mask[:, 20:, 1] = 1
    pixels = torch.randn(batch, images, 3, 56, 56)
    return model, (ids, mask, pixels, image_mask)


def test_cuda_fp32_equals_cpu_and_fp16_keeps_top1(seed):
    model, inputs = _model_and_inputs(seed)
    with torch.no_grad():
        cpu = model(*inputs)
        model = model.cuda()
        cuda_inputs = [x.cuda() for x in inputs]
        torch.backends.cuda.matmul.allow_tf32 = False
        fp32 = model(*cuda_inputs).cpu()
        half_inputs = [x.half() if x.is_floating_point() else x for x in cuda_inputs]
        fp16 = model.half()(*half_inputs).float().cpu()
    real = inputs[1].bool()
    assert relative_error(fp32[real], cpu[real]) <= LOGITS_REL_TOL
    assert torch.isfinite(fp16).all(), "fp16 logits overflowed"
    agreement = (fp16.argmax(-1) == cpu.argmax(-1))[real].float().mean().item()
    print(f"fp32 cuda vs cpu rel. error {relative_error(fp32[real], cpu[real]):.2e}; fp16 top-1 agreement {agreement:.4f}")
    assert agreement >= FP16_TOP1_AGREEMENT
