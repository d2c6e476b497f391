"""Build tiny OpenFlamingo reference models with the upstream code and write test fixtures.

Run inside the venv made by build.sh (open_flamingo 2.0.1, transformers 4.33.3, open_clip_torch 2.20.0, CPU torch).
Everything is built offline from small configs; every value is derived from fixed seeds, so two runs on the same
machine write byte-identical files.  See README.md beside this file for the layout of what is written.

Usage: python make_fixtures.py [--out DIR]   (default: <repo>/tests/fixtures/openflamingo)
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import argparse
import contextlib
import io
import json
import math
import shutil
import sys
import tempfile
import time
import types
import warnings
import zlib
from pathlib import Path

warnings.filterwarnings("ignore")

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

import open_clip
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    GPTNeoXTokenizerFast,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaTokenizerFast,
    MptConfig,
    MptForCausalLM,
)
from transformers.models.mpt import modeling_mpt

from open_flamingo import create_model_and_transforms

# open_flamingo.train.train_utils imports wandb at module level but filter_state_dict_to_trainable does not use it;
# a stub module lets us call open_flamingo's own filter instead of a copy of it.
sys.modules.setdefault("wandb", types.ModuleType("wandb"))
from open_flamingo.train.train_utils import filter_state_dict_to_trainable  # noqa: E402

transformers.logging.set_verbosity_error()
torch.set_num_threads(1)  # reductions split the same way on every machine
torch.use_deterministic_algorithms(True)

REPO = Path(__file__).resolve().parents[3]
FAMILIES = ("llama", "mpt", "gpt_neox")
CROSS_ATTN_EVERY = {"llama": 2, "mpt": 1, "gpt_neox": 2}
VISION_NAME = "vision"  # open_clip registers a config file under its stem: vision.json -> "vision"
MAX_NEW_TOKENS = 12

VISION_CFG = {
    "embed_dim": 32,
    "quick_gelu": False,  # plain nn.GELU like ViT-L-14 (not the OpenAI quickgelu variants)
    "vision_cfg": {"image_size": 56, "layers": 2, "width": 32, "head_width": 16, "mlp_ratio": 4.0, "patch_size": 14},
    "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}

CORPUS = """\
A photo of a dog playing in the park. A photo of a cat sleeping on a red sofa.
An image of two birds sitting on a branch. An image of a small boat on a blue lake.
The quick brown fox jumps over the lazy dog. The dog runs after the ball in the garden.
Question: what is shown in the picture? Answer: a red square and a blue circle.
Question: how many animals are there? Answer: there are three animals.
Output: a yellow triangle on a green background. Output: stripes of black and white.
A close up of a striped shirt. A picture of noise, gradients and simple shapes.
The sun is shining over the mountains and the river flows through the valley.
Children are reading books in the library while their teacher writes on the board.
A man is riding a bicycle down the street next to a woman walking with an umbrella.
This is a photo of a kitchen with a table, four chairs and a bowl of fresh fruit.
Look at the image and describe what you see. There is a house with a white door.
The train arrives at the station in the morning and leaves again in the evening.
Two people are sitting at a cafe drinking coffee and talking about the weather.
A plate of food with rice, beans and vegetables. A glass of water on the table.
The city at night is full of lights, cars and people walking on the streets.
An airplane is flying high above the clouds on a clear and sunny day.
A group of friends is playing football on a field of green grass.
"""

# ----------------------------------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def quiet():
    """Silence create_model_and_transforms' print of the trainable-parameter count and transformers' "Using
    pad_token, but it is not set yet." (logged at error level when open_flamingo checks for a pad token)."""
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity(transformers.logging.CRITICAL)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        transformers.logging.set_verbosity(level)


def gen(tag: str) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(zlib.crc32(tag.encode()))
    return g


def bf16_exact(x: torch.Tensor) -> torch.Tensor:
    # every random value is rounded to a bfloat16-representable float32: the references are still computed in
    # float32, but the weights also convert to bf16 losslessly, and the files compress better in git
    return x.to(torch.bfloat16).float()


def normal(shape, std, tag, mean=0.0):
    return bf16_exact(torch.randn(shape, generator=gen(tag), dtype=torch.float32) * std + mean)


def randomize(module: nn.Module, prefix: str, seed_tag: str, tied_embedding_std: float = 0.3) -> int:
    """Give every parameter of `module` O(1)-scale random values, each from a generator seeded by its name.

    matrices ~ N(0, 1/sqrt(fan_in)); norm weights ~ N(1, 0.1); biases ~ N(0, 0.1); embeddings, class/positional
    embeddings and perceiver latents ~ N(0, 1) (a tied input/output embedding: N(0, 0.3), so that MPT's logits
    stay O(10)); tanh gates ~ U[0.5, 1.5].  Shared (tied) parameters are set once,
    under the first name they are met at.  Raises on a parameter no rule covers.
    """
    seen = set()
    count = 0
    tied = set()
    if hasattr(module, "get_output_embeddings") and module.get_output_embeddings() is not None:
        if module.get_output_embeddings().weight is module.get_input_embeddings().weight:
            tied.add(id(module.get_input_embeddings().weight))
    for mod_name, mod in module.named_modules(prefix=prefix):
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{mod_name}.{pname}"
            tag = f"{seed_tag}/{full}"
            kind = type(mod).__name__
            shape = tuple(p.shape)
            if "Norm" in kind:  # nn.LayerNorm, open_clip LayerNorm, LlamaRMSNorm
                value = normal(shape, 0.1, tag, mean=1.0 if pname == "weight" else 0.0)
            elif isinstance(mod, nn.Embedding):
                # a tied embedding is also the output layer: N(0, 1) would give logits of std ~sqrt(d_model)
                value = normal(shape, tied_embedding_std if id(p) in tied else 1.0, tag)
            elif isinstance(mod, (nn.Linear, nn.Conv2d)):
                if pname == "weight":
                    value = normal(shape, 1.0 / math.sqrt(p[0].numel()), tag)
                else:
                    value = normal(shape, 0.1, tag)
            elif isinstance(mod, nn.MultiheadAttention) and pname == "in_proj_weight":
                value = normal(shape, 1.0 / math.sqrt(shape[1]), tag)
            elif isinstance(mod, nn.MultiheadAttention) and pname == "in_proj_bias":
                value = normal(shape, 0.1, tag)
            elif pname in ("attn_gate", "ff_gate"):
                value = bf16_exact(torch.rand(shape, generator=gen(tag)) + 0.5)
            elif pname in ("latents", "class_embedding", "positional_embedding"):
                value = normal(shape, 1.0, tag)
            elif pname in ("proj", "text_projection"):  # used as x @ proj: fan_in is dim 0
                value = normal(shape, 1.0 / math.sqrt(shape[0]), tag)
            elif pname == "logit_scale":
                continue
            else:
                raise RuntimeError(f"no randomisation rule for {full} ({kind}, {shape})")
            with torch.no_grad():
                p.copy_(value)
            count += 1
    return count


def patched_build_mpt_alibi_tensor(num_heads, sequence_length, alibi_bias_max=8, device=None):
    """transformers' later fix of build_mpt_alibi_tensor (identical to transformers 5.x and to MosaicML's
    gen_slopes): 4.33.3 does `slopes.view(1, num_heads, 1, 1)` on the num_heads_power_of_2 slopes, which raises
    for a head count that is not a power of two, and its interleave slices the batch axis (a no-op)."""
    alibi = torch.arange(1 - sequence_length, 1, dtype=torch.int32, device=device).view(1, 1, 1, sequence_length)
    num_heads_power_of_2 = 2 ** math.ceil(math.log2(num_heads))
    base = torch.arange(1, num_heads_power_of_2 + 1, dtype=torch.int64, device=device).float()
    base = base * (alibi_bias_max / num_heads_power_of_2)
    slopes = 1.0 / torch.pow(2, base)
    slopes = slopes.view(1, num_heads_power_of_2, 1, 1)
    if num_heads_power_of_2 != num_heads:
        slopes = torch.concat([slopes[:, 1::2, ...], slopes[:, ::2, ...]], dim=1)[:, :num_heads, ...]
    alibi = alibi * slopes
    return alibi.squeeze(0)


def stock_alibi_works(num_heads: int) -> bool:
    try:
        modeling_mpt.build_mpt_alibi_tensor(num_heads, 4)
        return True
    except RuntimeError:
        return False


# ----------------------------------------------------------------------------------------------------- images


def make_images(folder: Path) -> list[str]:
    """Four RGB images of non-square and square sizes with gradients, shapes, stripes and noise."""
    rng = np.random.default_rng(1234)
    specs = [("img0_80x61.png", 80, 61), ("img1_47x100.png", 47, 100), ("img2_56x56.png", 56, 56),
             ("img3_130x97.png", 130, 97)]
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for k, (name, w, h) in enumerate(specs):
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
        img = np.zeros((h, w, 3), np.float64)
        img[..., 0] = 255 * xx / max(w - 1, 1)
        img[..., 1] = 255 * yy / max(h - 1, 1)
        img[..., 2] = 127 + 120 * np.sin((xx + 2 * yy) / (3.0 + k))
        cx, cy, r = w * (0.3 + 0.1 * k), h * (0.6 - 0.1 * k), min(w, h) / 4
        disk = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2
        img[disk] = [255 - 60 * k, 40 * k, 200]
        x0, y0 = int(w * 0.55), int(h * 0.15)
        img[y0 : y0 + h // 4, x0 : x0 + w // 4] = [20, 200 - 30 * k, 60 + 40 * k]
        if k % 2:
            img[:, :: 6 + k] = [0, 0, 0]
        img += rng.normal(0, 12, img.shape)
        arr = np.clip(np.round(img), 0, 255).astype(np.uint8)
        Image.fromarray(arr, "RGB").save(folder / name, optimize=False, compress_level=9)
        names.append(name)
    return names


def load_image(folder: Path, name: str) -> Image.Image:
    with Image.open(folder / name) as im:
        return im.convert("RGB")


# ----------------------------------------------------------------------------------------------------- tokenizers


def train_tokenizer(family: str) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE (~500 tokens) trained on CORPUS, wrapped in the family's HF fast tokenizer class."""
    specials = ["<unk>", "<s>", "</s>"] if family == "llama" else ["<|endoftext|>", "<|padding|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer)
    if family == "llama":
        # LLaMA: <unk>=0, <s>=1, </s>=2; BOS added by the post-processor (add_bos_token=True); no pad token.
        return LlamaTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  add_bos_token=True, add_eos_token=False)
    extra = {"pad_token": "<|padding|>"} if family == "mpt" else {}
    # GPT-NeoX-20B layout: <|endoftext|>=0 is bos/eos/unk, <|padding|>=1; no BOS added.  The GPT-NeoX fixture
    # has no pad token; the MPT fixture names <|padding|> as its pad token, so open_flamingo adds no <PAD>.
    return GPTNeoXTokenizerFast(tokenizer_object=tok, unk_token="<|endoftext|>", bos_token="<|endoftext|>",
                                eos_token="<|endoftext|>", add_prefix_space=False, **extra)


# ----------------------------------------------------------------------------------------------------- LMs


def build_lm(family: str, vocab: int, bos: int, eos: int) -> nn.Module:
    torch.manual_seed(zlib.crc32(f"{family}/lm-init".encode()))
    if family == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                          rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=bos, eos_token_id=eos,
                          pad_token_id=None)
        return LlamaForCausalLM(cfg)
    if family == "mpt":
        cfg = MptConfig(d_model=96, n_heads=6, n_layers=4, expansion_ratio=4, max_seq_len=128, vocab_size=vocab,
                        no_bias=True, attn_config={"alibi": True, "alibi_bias_max": 8}, layer_norm_epsilon=1e-5,
                        tie_word_embeddings=True, bos_token_id=bos, eos_token_id=eos, use_cache=True)
        return MptForCausalLM(cfg)
    cfg = GPTNeoXConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=256, hidden_act="gelu", rotary_pct=0.25, rotary_emb_base=10000,
                        max_position_embeddings=128, use_parallel_residual=True, tie_word_embeddings=False,
                        bos_token_id=bos, eos_token_id=eos, layer_norm_eps=1e-5)
    return GPTNeoXForCausalLM(cfg)


# ----------------------------------------------------------------------------------------------------- cases


def prompts_for(family: str):
    """(name, prompts, images per prompt).  Image names index make_images()' files."""
    return [
        ("a_interleaved", ["A short story.<image>A red circle on a green field.<|endofchunk|><image>Stripes of "
                           "black and white.<|endofchunk|><image>A photo of"],
         [["img0_80x61.png", "img1_47x100.png", "img3_130x97.png"]]),
        ("b_vqa", ["<image>Question: what is shown in the picture? Answer: a blue circle.<|endofchunk|><image>"
                   "Question: what is shown in the picture? Answer:"],
         [["img2_56x56.png", "img0_80x61.png"]]),
        ("c_left_padded_batch", ["<image>An image of", "Look at the image.<image>The dog runs.<|endofchunk|>"
                                 "<image>A plate of food.<|endofchunk|><image>An image of two"],
         [["img3_130x97.png"], ["img1_47x100.png", "img2_56x56.png", "img0_80x61.png"]]),
    ]


def build_vision_x(image_processor, folder: Path, images_per_prompt) -> torch.Tensor:
    """(B, T_max, 1, 3, H, W); a prompt with fewer images is padded on the image axis with all-zero images at the
    end, as open_flamingo's eval code does (eval_model._prepare_images).  The padding images are encoded but never
    attended: a token attends image k only if it follows the k-th <image> of its own row."""
    t_max = max(len(x) for x in images_per_prompt)
    size = image_processor.transforms[1].size
    out = torch.zeros(len(images_per_prompt), t_max, 1, 3, size[0], size[1])
    for b, names in enumerate(images_per_prompt):
        for t, name in enumerate(names):
            out[b, t, 0] = image_processor(load_image(folder, name))
    return out


def run_cases(model, tokenizer, image_processor, image_folder: Path, family: str):
    results = []
    tokenizer.padding_side = "left"
    model.eval()
    for name, prompts, images in prompts_for(family):
        enc = tokenizer(prompts, return_tensors="pt", padding="longest")
        vision_x = build_vision_x(image_processor, image_folder, images)
        with torch.no_grad():
            logits = model(vision_x, enc["input_ids"], enc["attention_mask"]).logits.float()
            out = model.generate(vision_x, enc["input_ids"], enc["attention_mask"], max_new_tokens=MAX_NEW_TOKENS,
                                 num_beams=1, return_dict_in_generate=True, output_scores=True)
        new = out.sequences[:, enc["input_ids"].shape[1]:]
        # greedy with no logits processors: scores[i] are the raw next-token logits of decode step i (B, V)
        scores = torch.stack(out.scores, dim=1).float()
        results.append(dict(name=name, prompts=prompts, images=images, input_ids=enc["input_ids"],
                            attention_mask=enc["attention_mask"], vision_x=vision_x, logits=logits, generated=new,
                            generate_scores=scores))
    return results


def run_one(model, tokenizer, image_processor, image_folder: Path, prompt: str, images) -> torch.Tensor:
    enc = tokenizer([prompt], return_tensors="pt")
    vision_x = build_vision_x(image_processor, image_folder, [images])
    with torch.no_grad():
        return model(vision_x, enc["input_ids"], enc["attention_mask"]).logits.float()


def make_generation_stop(model, tok, image_processor, image_folder, family, out_emb, eoc, vocab) -> dict:
    """Random weights almost never pick <|endofchunk|>; make some generations stop on it.

    The <|endofchunk|> output row (an OpenFlamingo-added row; for tied MPT also its input row) becomes 1.25x the
    row of a token that greedy decoding produces, so <|endofchunk|> wins wherever that token would.  Candidates are
    tried in a fixed order until, in the left-padded batch, exactly one row stops (after >= 2 tokens) and the
    other runs to max_new_tokens; if none does, the first candidate with which some row stops after >= 1 token and
    some row runs to the end.  Returns which token was copied."""
    base = run_cases(model, tok, image_processor, image_folder, family)
    candidates = []
    for c in base:
        for row in c["generated"]:
            for t in row[1:].tolist():
                if t < vocab and t not in candidates and t not in tok.all_special_ids:
                    candidates.append(t)
    # then the tokens that score highest anywhere from the third decode step of the batch case on
    ranked = base[-1]["generate_scores"][:, 2:, :vocab].amax(dim=(0, 1)).argsort(descending=True).tolist()
    candidates += [t for t in ranked if t not in candidates and t not in tok.all_special_ids][:40]

    def first_stops(res):
        return [[int((row == eoc).nonzero()[0, 0]) if (row == eoc).any() else None for row in c["generated"]]
                for c in res]

    def batch_split(stops):  # exactly one row of the left-padded batch stops, after >= 2 tokens
        last = stops[-1]
        return sum(f is not None for f in last) == 1 and all(f is None or f >= 2 for f in last)

    def any_split(stops):  # some row stops after >= 1 token and some row runs to the end
        flat = [f for case in stops for f in case]
        return any(f is not None and f >= 1 for f in flat) and any(f is None for f in flat)

    original = out_emb[eoc].clone()
    tried = []
    for t in candidates:
        with torch.no_grad():
            out_emb[eoc] = 1.25 * out_emb[t]
        tried.append((t, first_stops(run_cases(model, tok, image_processor, image_folder, family))))
        if batch_split(tried[-1][1]):
            break
    else:
        tried = [x for x in tried if any_split(x[1])][:1]
        if not tried:
            with torch.no_grad():
                out_emb[eoc] = original
            raise RuntimeError(f"{family}: no candidate row makes a generation stop on <|endofchunk|>")
        with torch.no_grad():
            out_emb[eoc] = 1.25 * out_emb[tried[0][0]]
    t = tried[-1][0] if batch_split(tried[-1][1]) else tried[0][0]
    return {"copied_token_id": t, "copied_token": tok.convert_ids_to_tokens(t), "scale": 1.25}


# ----------------------------------------------------------------------------------------------------- one family


def state_dict_for_safetensors(sd: dict) -> dict:
    # safetensors refuses tensors that share storage (the aliases, tied weights): clone each one
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def build_family(family: str, root: Path, image_folder: Path, image_names: list[str], log) -> dict:
    t0 = time.time()
    fdir = root / family
    lm_dir = fdir / "lm"
    lm_dir.mkdir(parents=True)

    # 1. tokenizer + tiny LM with random O(1) weights, saved as a user downloads it (no OpenFlamingo tokens yet)
    tokenizer = train_tokenizer(family)
    vocab = len(tokenizer)
    lm = build_lm(family, vocab, tokenizer.bos_token_id, tokenizer.eos_token_id)
    if family == "mpt" and not stock_alibi_works(lm.config.n_heads):
        modeling_mpt.build_mpt_alibi_tensor = patched_build_mpt_alibi_tensor
    randomize(lm, "", f"{family}/lm")
    lm.save_pretrained(lm_dir, safe_serialization=True)
    if family == "mpt":
        # transformers writes only the non-default attn_config fields ({"model_type": ""}); spell them out, as
        # MosaicML's own config.json files do, so that a reader of config.json sees alibi and alibi_bias_max
        cfg_path = lm_dir / "config.json"
        cfg = json.loads(cfg_path.read_text())
        a = lm.config.attn_config
        cfg["attn_config"] = {k: getattr(a, k) for k in (
            "attn_type", "attn_pdrop", "attn_impl", "clip_qkv", "softmax_scale", "prefix_lm", "qk_ln",
            "attn_uses_sequence_id", "alibi", "alibi_bias_max")}
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(lm_dir)
    lm_class = type(lm).__name__
    del lm

    # 2. the vision tower config, registered with open_clip
    (fdir / "vision.json").write_text(json.dumps(VISION_CFG, indent=2, sort_keys=True) + "\n")
    open_clip.add_model_config(fdir / "vision.json")

    # 3. OpenFlamingo from these folders, exactly as a user builds it
    torch.manual_seed(zlib.crc32(f"{family}/of-init".encode()))
    n_every = CROSS_ATTN_EVERY[family]
    with quiet():
        model, image_processor, tok = create_model_and_transforms(
            clip_vision_encoder_path=VISION_NAME, clip_vision_encoder_pretrained=None,
            lang_encoder_path=str(lm_dir), tokenizer_path=str(lm_dir), cross_attn_every_n_layers=n_every,
            use_local_files=True)
    lang = model.lang_encoder

    # 4. random O(1) values for everything open_flamingo adds (the LM keeps lm/'s weights)
    randomize(model.vision_encoder, "vision_encoder", f"{family}/of")
    randomize(model.perceiver, "perceiver", f"{family}/of")
    randomize(lang.gated_cross_attn_layers, "lang_encoder.gated_cross_attn_layers", f"{family}/of")
    emb = lang.get_input_embeddings().weight
    out_emb = lang.get_output_embeddings().weight
    tied = out_emb is emb
    n_new = len(tok) - vocab
    with torch.no_grad():
        emb[vocab:] = normal((n_new, emb.shape[1]), 0.3 if tied else 1.0, f"{family}/of/new-input-rows")
        if not tied:
            out_emb[vocab:] = normal((n_new, out_emb.shape[1]), 1.0 / math.sqrt(out_emb.shape[1]),
                                     f"{family}/of/new-output-rows")
    eoc = tok.encode("<|endofchunk|>")[-1]
    eoc_source = make_generation_stop(model, tok, image_processor, image_folder, family, out_emb, eoc, vocab)

    # 5. reference cases
    cases = run_cases(model, tok, image_processor, image_folder, family)

    # 6. checkpoints
    full_sd = model.state_dict()
    if family == "llama":  # the whole state_dict() as safetensors: every alias stored as a copy of its own
        save_file(state_dict_for_safetensors(full_sd), str(fdir / "checkpoint_full.safetensors"))
    else:  # as a pickle: aliases (and tied weights) share one storage, so the file holds each tensor once
        torch.save(dict(full_sd), fdir / "checkpoint_full.pt")
    ckpt = filter_state_dict_to_trainable(model, dict(model.state_dict()))
    filter_keys = sorted(ckpt)
    added_keys = []
    out_name = next(n for n, p in model.named_parameters() if p is out_emb)
    if out_name not in ckpt:
        # open_flamingo's filter keeps parameters that are trainable or have "embed" in their name; an untied
        # output layer called lm_head (LLaMA) is neither, so a released checkpoint lacks the rows of the added
        # tokens (open_flamingo leaves them at resize_token_embeddings' random init).  We add the whole output
        # matrix so that lm/ + checkpoint.pt describe the reference model completely.
        ckpt[out_name] = out_emb
        added_keys.append(out_name)
    ckpt = {k: v.detach().clone().contiguous() for k, v in sorted(ckpt.items())}
    torch.save(ckpt, fdir / "checkpoint.pt")

    # 7. the open_clip CLIP state dict as open_clip's pretrained files lay it out (visual.* + text tower)
    torch.manual_seed(zlib.crc32(f"{family}/clip-init".encode()))
    clip = open_clip.create_model(VISION_NAME, pretrained=None)
    randomize(clip.transformer, "transformer", f"{family}/clip-text")
    randomize(clip.token_embedding, "token_embedding", f"{family}/clip-text")
    randomize(clip.ln_final, "ln_final", f"{family}/clip-text")
    with torch.no_grad():
        clip.positional_embedding.copy_(normal(tuple(clip.positional_embedding.shape), 1.0, f"{family}/clip-pos"))
        clip.text_projection.copy_(normal(tuple(clip.text_projection.shape), clip.text_projection.shape[0] ** -0.5,
                                          f"{family}/clip-proj"))
    clip.visual.load_state_dict(model.vision_encoder.state_dict(), strict=True)
    save_file(state_dict_for_safetensors(clip.state_dict()), str(fdir / "open_clip.safetensors"))

    # 8. tensors + cases.json
    tensors = {}
    case_meta = []
    for c in cases:
        n = c["name"]
        for key in ("input_ids", "attention_mask", "vision_x", "logits", "generated", "generate_scores"):
            tensors[f"{n}/{key}"] = c[key].contiguous()
        alone = {}
        if len(c["prompts"]) > 1:  # each prompt of a batch also run alone (no padding): see "position_ids" note
            for b in range(len(c["prompts"])):
                a = run_one(model, tok, image_processor, image_folder, c["prompts"][b],
                            c["images"][b])
                tensors[f"{n}/row{b}/logits_alone"] = a.contiguous()
                keep = c["attention_mask"][b].bool()
                alone[f"row{b}"] = float((c["logits"][b][keep] - a[0]).abs().max())
        stopped = [bool((row == eoc).any()) for row in c["generated"]]
        valid = [int((row == eoc).nonzero()[0, 0]) + 1 if s else int(row.numel()) for row, s in
                 zip(c["generated"], stopped)]
        case_meta.append({
            "name": n,
            "prompts": c["prompts"],
            "images": c["images"],
            "padding_side": "left",
            "image_axis_padding": "zeros appended (B, T_max, 1, 3, H, W)" if len(set(map(len, c["images"]))) > 1
            else "none",
            "input_ids": c["input_ids"].tolist(),
            "attention_mask": c["attention_mask"].tolist(),
            "vision_x_shape": list(c["vision_x"].shape),
            "logits_shape": list(c["logits"].shape),
            "generated_new_tokens": c["generated"].tolist(),
            "stopped_on_endofchunk": stopped,
            "generated_valid_length": valid,
            "max_abs_diff_padded_row_vs_alone": alone,
        })
    save_file(tensors, str(fdir / "tensors.safetensors"))

    decoder_attr = lang.decoder_layers_attr_name
    xattn_layers = [i for i, g in enumerate(lang.gated_cross_attn_layers) if g is not None]
    special = {
        "<|endofchunk|>": eoc,
        "<image>": tok.encode("<image>")[-1],
        "pad_token": tok.pad_token,
        "pad": tok.pad_token_id,
        "bos_token": tok.bos_token,
        "bos": tok.bos_token_id,
        "eos_token": tok.eos_token,
        "eos": tok.eos_token_id,
        "unk_token": tok.unk_token,
        "unk": tok.unk_token_id,
        "added_by_open_flamingo": tok.convert_ids_to_tokens(list(range(vocab, len(tok)))),
        "adds_bos_when_encoding": tok("x")["input_ids"][0] == tok.bos_token_id,
    }
    meta = {
        "family": family,
        "versions": {"open_flamingo": "2.0.1", "transformers": transformers.__version__,
                     "open_clip_torch": open_clip.version.__version__, "torch": torch.__version__.split("+")[0]},
        "lm_class": lm_class,
        "lm_vocab_size": vocab,
        "len_tokenizer": len(tok),
        "tied_embeddings": tied,
        "decoder_layers_attr_name": decoder_attr,
        "cross_attn_every_n_layers": n_every,
        "cross_attn_layer_indices": xattn_layers,
        "special_token_ids": special,
        "open_clip_model_name": VISION_NAME,
        "vis_dim": model.vis_dim,
        "lang_dim": model.lang_dim,
        "endofchunk_output_row": eoc_source,
        "position_ids": "Flamingo.forward passes no position_ids: LLaMA and GPT-NeoX then use 0..T-1 for every row, "
                        "pad positions included, while generate() derives position_ids = cumsum(attention_mask) - 1. "
                        "Rotary embeddings are relative, so a left-padded row's logits equal the same prompt run "
                        "alone (<case>/row<b>/logits_alone) up to float rounding "
                        "(cases[].max_abs_diff_padded_row_vs_alone). MPT (ALiBi) has no position ids.",
        "mpt_alibi_patched": family == "mpt" and modeling_mpt.build_mpt_alibi_tensor is patched_build_mpt_alibi_tensor,
        "mpt_alibi_slopes": (-modeling_mpt.build_mpt_alibi_tensor(lang.config.n_heads, 2)[:, 0, 0]).tolist()
        if family == "mpt" else None,
        "checkpoint": {
            "file": "checkpoint.pt",
            "filter": "open_flamingo.train.train_utils.filter_state_dict_to_trainable",
            "keys_from_filter": filter_keys,
            "keys_added_beyond_filter": added_keys,
            "load": "torch.load(path, weights_only=True); model.load_state_dict(sd, strict=False) after "
                    "create_model_and_transforms(lm/) and loading visual.* of open_clip.safetensors",
        },
        "model_mode": "eval()",
        "forward_call": "model(vision_x, input_ids, attention_mask).logits (float32)",
        "generate_call": f"model.generate(vision_x, input_ids, attention_mask, max_new_tokens={MAX_NEW_TOKENS}, "
                         "num_beams=1): new tokens only; rows that stopped are padded with <|endofchunk|>",
        "cases": case_meta,
    }
    (fdir / "cases.json").write_text(json.dumps(meta, indent=1, sort_keys=False) + "\n")

    # 9. self-check: rebuild as a user would (lm/ + vision.json + open_clip.safetensors + checkpoint.pt) and
    #    compare with the recorded tensors
    del model
    torch.manual_seed(987654321)  # anything the files do not set would now differ
    with quiet():
        model2, proc2, tok2 = create_model_and_transforms(
            clip_vision_encoder_path=VISION_NAME, clip_vision_encoder_pretrained=None,
            lang_encoder_path=str(lm_dir), tokenizer_path=str(lm_dir), cross_attn_every_n_layers=n_every,
            use_local_files=True)
    clip_sd = load_file(str(fdir / "open_clip.safetensors"))
    model2.vision_encoder.load_state_dict({k[len("visual."):]: v for k, v in clip_sd.items()
                                           if k.startswith("visual.")}, strict=True)
    loaded = torch.load(fdir / "checkpoint.pt", weights_only=True)
    missing, unexpected = model2.load_state_dict(loaded, strict=False)
    assert not unexpected, unexpected
    # missing: the vision tower (loaded above), frozen LM weights (from lm/) and second aliases of loaded modules;
    # never a perceiver or gated cross-attention weight under its wrapped name
    assert not [k for k in missing if k.startswith("perceiver.") or ".gated_cross_attn_layer." in k], missing
    sd2 = model2.state_dict()
    assert sd2.keys() == full_sd.keys()
    for k, v in full_sd.items():
        assert torch.equal(sd2[k], v), f"reloaded {k} differs"
    recorded = load_file(str(fdir / "tensors.safetensors"))
    again = run_cases(model2, tok2, proc2, image_folder, family)
    worst = 0.0
    for c in again:
        n = c["name"]
        assert torch.equal(c["input_ids"], recorded[f"{n}/input_ids"])
        assert torch.equal(c["vision_x"], recorded[f"{n}/vision_x"])
        worst = max(worst, (c["logits"] - recorded[f"{n}/logits"]).abs().max().item())
        assert torch.equal(c["generated"], recorded[f"{n}/generated"]), n
        worst = max(worst, (c["generate_scores"] - recorded[f"{n}/generate_scores"]).abs().max().item())
    assert worst <= 1e-6, worst

    lmax = max(float(c["logits"].abs().max()) for c in cases)
    assert all(torch.isfinite(c["logits"]).all() for c in cases)
    log(f"{family}: {lm_class} vocab {vocab}+{n_new}, xattn before layers {xattn_layers} of {decoder_attr}, "
        f"|logits| max {lmax:.2f}, stopped on <|endofchunk|> {[m['stopped_on_endofchunk'] for m in case_meta]}, "
        f"reload max diff {worst:.1e}, {time.time() - t0:.1f}s")
    return meta


def write_preprocess(root: Path, image_folder: Path, names: list[str], image_processor) -> None:
    """open_clip's real eval transforms on each image: at the model's size (56) and at 33 (odd crop offsets)."""
    other = open_clip.image_transform(33, is_train=False)
    tensors, index = {}, {}
    for size, proc in ((VISION_CFG["vision_cfg"]["image_size"], image_processor), (33, other)):
        for name in names:
            key = f"{Path(name).stem}@{size}"
            tensors[key] = proc(load_image(image_folder, name)).contiguous()
            index[key] = {"image": name, "image_size": size}
    save_file(tensors, str(root / "preprocess.safetensors"))
    desc = {
        "transform": "open_clip.image_transform(image_size, is_train=False) (open_clip_torch 2.20.0): "
                     "Resize(image_size, bicubic) of the shorter side, CenterCrop(image_size), RGB, ToTensor, "
                     "Normalize(OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)",
        "mean": list(open_clip.OPENAI_DATASET_MEAN),
        "std": list(open_clip.OPENAI_DATASET_STD),
        "model_transform": [getattr(t, "__name__", None) or repr(t) for t in image_processor.transforms],
        "keys": index,
    }
    (root / "preprocess.json").write_text(json.dumps(desc, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures" / "openflamingo")
    args = ap.parse_args()
    t0 = time.time()
    out = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    # build into a staging folder beside the target; replace the target only when every self-check passed
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        image_folder = stage / "images"
        names = make_images(image_folder)
        for family in FAMILIES:
            build_family(family, stage, image_folder, names, print)
        # the model-size transform is the one create_model_and_transforms returned (same for every family)
        _, _, proc = open_clip.create_model_and_transforms(VISION_NAME, pretrained=None)
        write_preprocess(stage, image_folder, names, proc)
        stage.chmod(0o755)  # mkdtemp makes it 0700
        if out.exists():
            shutil.rmtree(out)
        stage.rename(out)
    finally:
        if stage.exists():
            shutil.rmtree(stage)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out} "
          f"({size / 1e6:.2f} MB) in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
