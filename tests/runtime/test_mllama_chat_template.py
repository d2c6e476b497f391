"""Chat templates on a Llama 3.2 Vision (mllama) checkpoint against transformers' MllamaProcessor, both loaded from
the same save_pretrained folder: the rendered text equals transformers' `apply_chat_template(..., tokenize=False)`,
and our processor on the items gives what transformers' processor gives on (that text, the images); then through an
export and the ONNX Runtime pipeline, greedy tokens against transformers' `generate`."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from flamingo_edge.errors import CheckpointError, FeatureUnavailableError, PromptError
from flamingo_edge.runtime.processor import Processor, read_chat_template

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

transformers = pytest.importorskip("transformers", reason="the upstream reference: pip install -e '.[test]'")

LEGACY_PASS_ORDER = int(PIL.__version__.split(".")[0]) < 13  # resize as the Pillow transformers runs on
IMAGE_TOKEN = "<|image|>"

# The structure of Meta's Llama 3.2 Vision Instruct template (without its tool calling): BOS; the system block,
# with a date, only when no message has an image; a header per message; images as <|image|> where they are in the
# content; <|eot_id|> after each message; the assistant's header as the generation prompt.
TEMPLATE = r"""{{- bos_token }}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}

{#- The system message goes in the system block #}
{%- if messages[0]['role'] == 'system' %}
    {%- if messages[0]['content'] is string %}
        {%- set system_message = messages[0]['content'] | trim %}
    {%- else %}
        {%- set system_message = messages[0]['content'][0]['text'] | trim %}
    {%- endif %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{%- set image_ns = namespace(has_images=false) %}
{%- for message in messages %}
    {%- if message['content'] is not string %}
        {%- for content in message['content'] %}
            {%- if content['type'] == 'image' %}
                {%- set image_ns.has_images = true %}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
{%- endfor %}

{%- if image_ns.has_images and not system_message == "" %}
    {{- raise_exception("Prompting with images is incompatible with system messages.") }}
{%- endif %}

{%- if not image_ns.has_images %}
    {{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
    {{- "Cutting Knowledge Date: December 2023\n" }}
    {{- "Today Date: " + date_string + "\n\n" }}
    {{- system_message }}
    {{- "<|eot_id|>" }}
{%- endif %}

{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}
    {%- if message['content'] is string %}
        {{- message['content'] }}
    {%- else %}
        {%- for content in message['content'] %}
            {%- if content['type'] == 'image' %}
                {{- '<|image|>' }}
            {%- elif content['type'] == 'text' %}
                {{- content['text'] }}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
    {{- '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

# What else transformers' environment has: namespace, loopcontrols, {% generation %}, dict(), tojson without HTML
# escaping, the named special tokens, tools/documents, extra variables; messages as plain data (an array is
# "<ndarray>", keys whose value is None are dropped, reasoning is copied under the names templates read).
FEATURES = r"""{%- set ns = namespace(count=0) %}
{%- for message in messages %}
    {%- if loop.index > 2 %}{% break %}{% endif %}
    {%- set ns.count = ns.count + 1 %}
    {%- generation %}{{ message | tojson }}{% endgeneration %}
{%- endfor %}
{{ ns.count }} {{ dict(a=1, b=[1, 2]) | tojson }} {{ dict.fromkeys(["x"]) | tojson }} {{ bos_token }} {{ eos_token }}
{{- pad_token }} {{ tools }} {{ documents }} {{ date_string }} {{ add_generation_prompt }}"""


def _image(rng, height: int, width: int) -> np.ndarray:
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def _conversations(rng) -> dict[str, list[dict]]:
    def image(height, width):
        return {"type": "image", "image": _image(rng, height, width)}

    def text(value):
        return {"type": "text", "text": value}

    return {
        "one_image": [{"role": "user", "content": [image(20, 24), text("Describe it.")]}],
        "two_images_of_different_sizes": [
            {"role": "user", "content": [image(30, 60), image(50, 55), text("Compare the two pictures.")]}],
        "text_before_an_image": [{"role": "user", "content": [text("A photo: "), image(40, 80), text(" What is it?")]}],
        "multi_turn": [{"role": "user", "content": [image(20, 40), text("What is this?")]},
                       {"role": "assistant", "content": "A red square."},
                       {"role": "user", "content": [text("And its colour?")]}],
        "system_text_only": [{"role": "system", "content": "You answer briefly. "},  # today's date: strftime_now
                             {"role": "user", "content": "Describe a cat."}],
    }


CASES = sorted(_conversations(np.random.default_rng(0)))


@pytest.fixture(scope="module")
def checkpoint(seed, tmp_path_factory):
    """A tiny random mllama checkpoint saved by transformers with `TEMPLATE` as its processor's chat template."""
    from flamingo_edge.models.random_mllama import build_random_mllama

    folder = tmp_path_factory.mktemp("mllama-chat") / "checkpoint"
    model, processor = build_random_mllama("tiny", seed)
    processor.chat_template = TEMPLATE
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def processors(checkpoint):
    """(transformers' MllamaProcessor, ours), from the checkpoint."""
    ours = Processor.from_pretrained(checkpoint)
    ours.image_preprocessor.legacy_pass_order = LEGACY_PASS_ORDER
    return transformers.AutoProcessor.from_pretrained(checkpoint), ours


def _text(items: list) -> str:
    return "".join(item if isinstance(item, str) else IMAGE_TOKEN for item in items)


def _images(messages: list[dict]) -> list[np.ndarray]:
    return [block["image"] for message in messages if not isinstance(message["content"], str)
            for block in message["content"] if block["type"] == "image"]


def _upstream_inputs(upstream, text: str, images: list[np.ndarray], return_tensors: str = "np"):
    """transformers' processor on a rendered text as its `apply_chat_template(tokenize=True)` calls it: without
    special tokens when the template wrote BOS."""
    special = {"add_special_tokens": not text.startswith(upstream.tokenizer.bos_token)}
    if not images:
        return upstream(text=[text], return_tensors=return_tensors, **special)
    return upstream(text=[text], images=[[Image.fromarray(image) for image in images]], return_tensors=return_tensors,
                    **special)


def test_the_template_is_read_from_what_save_pretrained_wrote(checkpoint, processors):
    assert (checkpoint / "chat_template.jinja").is_file()
    assert read_chat_template(checkpoint) == TEMPLATE == processors[1].chat_template


@pytest.mark.parametrize("case", CASES)
def test_text_and_inputs_equal_transformers(processors, case, rng):
    upstream, ours = processors
    messages = _conversations(rng)[case]
    for add_generation_prompt in (True, False):
        items = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        expected = upstream.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
        assert _text(items) == expected
    assert expected.startswith("<|begin_of_text|>") and expected.count(IMAGE_TOKEN) == len(_images(messages))
    images = [item for item in items if isinstance(item, np.ndarray)]
    assert len(images) == len(_images(messages)) and all(a is b for a, b in zip(images, _images(messages)))

    expected = dict(_upstream_inputs(upstream, expected, images))
    got = ours([items])
    assert got["input_ids"][0, :2].tolist() != [ours.tokenizer.bos_token_id] * 2  # the template's BOS, once
    for key in ("input_ids", "attention_mask"):  # [1, S]
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    length = got["input_ids"].shape[1]
    if images:
        cross = expected["cross_attention_mask"]  # [1, S, M, T]
        np.testing.assert_array_equal(got["image_attention_mask"], cross.reshape(1, length, -1))
        for key in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"):
            np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    else:
        assert not got["image_attention_mask"].any() and "pixel_values" not in expected


def test_environment_and_message_data_equal_transformers(processors, rng):
    upstream, ours = processors
    messages = [{"role": "user", "content": [{"type": "text", "text": "café <b>&</b> \"quoted\""}], "name": None,
                 "attachment": _image(rng, 8, 8)},
                {"role": "assistant", "content": "ok", "reasoning": "because", "score": np.float32(0.5)},
                {"role": "user", "content": "never shown (loop break)"}]
    items = ours.apply_chat_template(messages, chat_template=FEATURES, date_string="1 Jan 2025")
    expected = upstream.apply_chat_template(messages, chat_template=FEATURES, add_generation_prompt=True,
                                            tokenize=False, date_string="1 Jan 2025")
    assert items == [expected] and "<ndarray>" in expected and "café <b>" in expected and '"thinking"' in expected


def test_named_templates(processors, checkpoint, tmp_path):
    upstream, ours = processors
    messages = [{"role": "user", "content": "Hi"}]
    named = Processor(ours.tokenizer, ours.image_preprocessor, ours.prompt_format,
                      chat_template={"default": TEMPLATE, "short": "{{ messages[0]['content'] }}!"})
    assert named.apply_chat_template(messages, chat_template="short") == ["Hi!"]
    assert named.apply_chat_template(messages) == ours.apply_chat_template(messages)
    without_default = Processor(ours.tokenizer, ours.image_preprocessor, ours.prompt_format,
                                chat_template={"a": "A", "b": "B"})
    with pytest.raises(CheckpointError, match=r"none named \"default\" \(a, b\); pass chat_template=NAME"):
        without_default.apply_chat_template(messages)


def test_the_other_places_a_template_is_kept(checkpoint, tmp_path):
    """Older saves, the tokenizer's entry, named templates: read in transformers' order (its processor's, when it
    has one: transformers' processor ignores tokenizer_config.json, which its tokenizer reads)."""
    import json
    import shutil

    def variant(name: str, files: dict[str, str], config_template=None):
        folder = tmp_path / name
        shutil.copytree(checkpoint, folder, ignore=shutil.ignore_patterns("*.safetensors", "chat_template.jinja"))
        for path, text in files.items():
            (folder / path).parent.mkdir(exist_ok=True)
            (folder / path).write_text(text)
        for config, entry in config_template or {}:
            data = json.loads((folder / config).read_text())
            (folder / config).write_text(json.dumps({**data, "chat_template": entry}))
        return folder

    legacy = variant("legacy", {"chat_template.json": json.dumps({"chat_template": TEMPLATE}),
                                "chat_template.jinja": "loses"})
    in_config = variant("processor_config", {"chat_template.jinja": "loses",
                                             "chat_template.json": json.dumps({"chat_template": "loses"})},
                        [("processor_config.json", TEMPLATE)])
    for folder in (legacy, in_config):
        upstream = transformers.AutoProcessor.from_pretrained(folder)
        assert read_chat_template(folder) == TEMPLATE == upstream.chat_template
    named = [{"name": "default", "template": TEMPLATE}, {"name": "tool_use", "template": "T"}]
    tokenizer_only = variant("tokenizer_config", {}, [("tokenizer_config.json", named)])
    assert read_chat_template(tokenizer_only) == {"default": TEMPLATE, "tool_use": "T"}
    upstream = transformers.AutoTokenizer.from_pretrained(tokenizer_only)
    assert read_chat_template(tokenizer_only) == upstream.chat_template
    files = variant("named", {"additional_chat_templates/tool_use.jinja": "T", "chat_template.jinja": TEMPLATE})
    assert read_chat_template(files) == {"default": TEMPLATE, "tool_use": "T"}
    assert read_chat_template(variant("none", {})) is None


def test_errors(processors, checkpoint, tmp_path, monkeypatch, rng):
    upstream, ours = processors
    image = _image(rng, 20, 20)
    with_system = [{"role": "system", "content": "Be brief."},
                   {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Hi"}]}]
    with pytest.raises(PromptError, match="Prompting with images is incompatible with system messages"):
        ours.apply_chat_template(with_system)
    for block in ({"type": "image"}, {"type": "image", "url": "https://example.com/a.jpg"},
                  {"type": "image", "image": Image.fromarray(image)}):
        with pytest.raises(PromptError, match=r"message 0, content 0 is an image block without its pixels.*load_image"):
            ours.apply_chat_template([{"role": "user", "content": [block, {"type": "text", "text": "Hi"}]}])
    typed = [{"role": "user", "content": [{"type": "text", "text": f"{IMAGE_TOKEN} Describe it."}]}]
    with pytest.raises(PromptError, match=r"wrote 1 <\|image\|> for 0 images"):
        ours.apply_chat_template(typed)
    for messages in ([], {"role": "user", "content": "Hi"}, [[{"role": "user", "content": "Hi"}]]):
        with pytest.raises(PromptError, match="messages must be one conversation"):
            ours.apply_chat_template(messages)
    with pytest.raises(CheckpointError, match=r"not valid Jinja \(line 1"):
        ours.apply_chat_template([{"role": "user", "content": "Hi"}], chat_template="{% for %}")
    with pytest.raises(PromptError, match="cannot set '_secret' on a namespace"):
        ours.apply_chat_template([{"role": "user", "content": "Hi"}],
                                 chat_template="{% set ns = namespace() %}{% set ns._secret = 1 %}")

    untemplated = Processor(ours.tokenizer, ours.image_preprocessor, ours.prompt_format)
    with pytest.raises(CheckpointError, match=r"no chat template .* write the prompt's items yourself"):
        untemplated.apply_chat_template([{"role": "user", "content": "Hi"}])

    monkeypatch.setitem(sys.modules, "jinja2", None)  # `import jinja2` now raises ImportError: the base install
    base = Processor.from_pretrained(checkpoint)  # loading needs no jinja2, only rendering does
    assert base.chat_template == TEMPLATE
    with pytest.raises(FeatureUnavailableError, match=r"need jinja2.*pip install 'flamingo-edge\[chat\]'"):
        base.apply_chat_template([{"role": "user", "content": "Hi"}])


def test_through_the_export_and_the_pipeline(checkpoint, processors, seed, rng, tmp_path_factory):
    """The export keeps the template, and generating from the chat items gives transformers' greedy tokens."""
    import torch

    from flamingo_edge.export.export import export_all
    from flamingo_edge.runtime.pipeline import Pipeline

    export = tmp_path_factory.mktemp("mllama-chat-export") / "export"
    export_all(checkpoint, export, seed=seed)
    assert read_chat_template(export) == TEMPLATE, "the export must copy the checkpoint's chat_template.jinja"
    upstream_processor, _ = processors
    messages = [{"role": "user", "content": [{"type": "text", "text": "Look: "},
                                             {"type": "image", "image": _image(rng, 30, 60)},
                                             {"type": "text", "text": "What is in it?"}]}]
    text = upstream_processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    batch = _upstream_inputs(upstream_processor, text, _images(messages), return_tensors="pt")
    model = transformers.MllamaForConditionalGeneration.from_pretrained(checkpoint).eval()
    eos = model.config.text_config.eos_token_id
    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=6, do_sample=False)[0, batch["input_ids"].shape[1]:]
    expected = [int(t) for t in generated]
    expected = expected[: expected.index(eos) + 1] if eos in expected else expected
    with Pipeline.open(export) as pipeline:
        items = pipeline.processor.apply_chat_template(messages)
        np.testing.assert_array_equal(pipeline.processor.tokenize([items]).input_ids, batch["input_ids"].numpy())
        completion = pipeline.complete([items], max_new_tokens=6, stop_token_ids=[eos])[0]
    assert completion.token_ids == expected


def test_ids_equal_transformers_own_tokenized_chat(processors, rng):
    """transformers' `apply_chat_template(..., tokenize=True)` on messages with PIL images: one BOS (the template's),
    the same ids, masks and pixels as our items give."""
    upstream, ours = processors
    messages = _conversations(rng)["two_images_of_different_sizes"]
    theirs = [{**m, "content": m["content"] if isinstance(m["content"], str) else [
        {**b, "image": Image.fromarray(b["image"])} if b["type"] == "image" else b for b in m["content"]]}
        for m in messages]
    expected = upstream.apply_chat_template(theirs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                            return_tensors="np")
    got = ours([ours.apply_chat_template(messages)])
    np.testing.assert_array_equal(got["input_ids"], expected["input_ids"])
    assert (got["input_ids"][0] == ours.tokenizer.bos_token_id).sum() == 1
    np.testing.assert_array_equal(got["pixel_values"], expected["pixel_values"])
    mask = expected["cross_attention_mask"]
    np.testing.assert_array_equal(got["image_attention_mask"], mask.reshape(*mask.shape[:2], -1))


def test_generate_chat_sends_the_prompt_through_the_template(checkpoint, tmp_path, capsys, rng):
    """`flamingo-edge generate --chat`: the prompt and its images as one user message, rendered by the template; the
    same tokens as the pipeline on `apply_chat_template` of that message."""
    import json

    import cv2

    from flamingo_edge.cli.main import main
    from flamingo_edge.export.export import export_all
    from flamingo_edge.runtime.pipeline import Pipeline
    from flamingo_edge.runtime.processor import load_image

    export = tmp_path / "export"
    export_all(checkpoint, export, seed=0)
    path = tmp_path / "photo.png"
    cv2.imwrite(str(path), _image(rng, 30, 60))
    assert main(["generate", str(export), "--chat", "--prompt", "Look: <image> What is it?", "--image", str(path),
                 "--max-new-tokens", "5", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    message = {"role": "user", "content": [{"type": "text", "text": "Look: "},
                                           {"type": "image", "image": load_image(path)},
                                           {"type": "text", "text": " What is it?"}]}
    with Pipeline.open(export) as pipeline:
        items = pipeline.processor.apply_chat_template([message])
        expected = pipeline.complete([items], max_new_tokens=5)[0]
    assert "<|start_header_id|>user<|end_header_id|>" in items[0]
    assert report["token_ids"] == expected.token_ids
