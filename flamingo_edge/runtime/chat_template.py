"""Chat templates: a checkpoint's Jinja template rendered as transformers renders it, torch-free.

`Processor.apply_chat_template` turns a conversation into the processor's prompt items with these functions. Only
rendering needs jinja2 (imported when a template is rendered; `pip install jinja2`); it runs in jinja2's
ImmutableSandboxedEnvironment with the settings and globals transformers' `apply_chat_template` gives templates.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from flamingo_edge.artifacts import read_json
from flamingo_edge.errors import CheckpointError, FeatureUnavailableError, PromptError
from flamingo_edge.runtime.image import PROCESSOR_CONFIG

# Where transformers (5.23) keeps a checkpoint's chat template: `ProcessorMixin.save_pretrained` writes
# chat_template.jinja, and named templates as additional_chat_templates/NAME.jinja; older versions wrote
# chat_template.json ({"chat_template": ...}) or a "chat_template" entry of processor_config.json; a tokenizer's
# template may be in tokenizer_config.json.
CHAT_TEMPLATE_FILE = "chat_template.jinja"
LEGACY_CHAT_TEMPLATE_FILE = "chat_template.json"
CHAT_TEMPLATE_DIR = "additional_chat_templates"
TOKENIZER_CONFIG = "tokenizer_config.json"
MIN_JINJA2 = (3, 1, 6)  # transformers refuses older jinja2, whose sandbox has known escapes
REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")  # names a message's reasoning goes under


def read_chat_template(folder: str | Path) -> str | dict[str, str] | None:
    """The chat template(s) of a checkpoint or export folder, from where transformers' processor reads them, in its
    order: processor_config.json's "chat_template", else chat_template.json's, else chat_template.jinja (named
    "default") with additional_chat_templates/*.jinja (named by file stem); without any of these, the tokenizer's,
    tokenizer_config.json's "chat_template" (which transformers' processor does not read, its tokenizer does).

    Returns:
        the template; {name: template} when there are several; None when there is none.

    Raises:
        CheckpointError: a file that is not valid JSON or UTF-8, or a template that is not a string.
    """
    folder = Path(folder)
    readers = (lambda: _json_chat_template(folder / PROCESSOR_CONFIG),
               lambda: _json_chat_template(folder / LEGACY_CHAT_TEMPLATE_FILE),
               lambda: _jinja_chat_templates(folder),
               lambda: _json_chat_template(folder / TOKENIZER_CONFIG))
    templates = next((found for found in (read() for read in readers) if found is not None), None)
    if isinstance(templates, dict) and list(templates) == ["default"]:
        return templates["default"]
    return templates


def _json_chat_template(path: Path) -> str | dict[str, str] | None:
    """The "chat_template" entry of a JSON file: a string, {name: template} or [{"name": ..., "template": ...}]."""
    if not path.is_file():
        return None
    entry = read_json(path).get("chat_template")
    if isinstance(entry, list) and all(isinstance(t, dict) and {"name", "template"} <= set(t) for t in entry):
        entry = {t["name"]: t["template"] for t in entry}
    if entry is None or isinstance(entry, str) or (
            isinstance(entry, dict) and all(isinstance(t, str) for t in entry.values())):
        return entry
    raise CheckpointError(f"{path}: \"chat_template\" is {entry!r:.80}; expected a Jinja template (a string), or a "
                          "list of {\"name\", \"template\"}; restore the file or re-save the processor")


def _jinja_chat_templates(folder: Path) -> dict[str, str] | None:
    paths = {path.stem: path for path in sorted((folder / CHAT_TEMPLATE_DIR).glob("*.jinja"))}
    if (folder / CHAT_TEMPLATE_FILE).is_file():
        paths["default"] = folder / CHAT_TEMPLATE_FILE
    try:
        return {name: path.read_text(encoding="utf-8") for name, path in paths.items()} or None
    except (OSError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{folder}: cannot read a chat template ({error}); restore the file") from None


def render_chat_template(template: str, messages: list, *, add_generation_prompt: bool = True,
                         variables: dict[str, Any] | None = None) -> str:
    """`template` rendered for `messages` as transformers (5.23, utils/chat_template_utils.py) renders it.

    The environment is jinja2's `ImmutableSandboxedEnvironment` with trim_blocks and lstrip_blocks, the loopcontrols
    extension and the `{% generation %}` tag; the globals `raise_exception`, `strftime_now`, `dict` and a
    `namespace` that refuses names starting with "_"; and a `tojson` filter that does not escape HTML. The template
    sees plain data only (`_template_data`): the messages, without keys whose value is None and with their
    reasoning under every name templates read; `tools` and `documents` (None unless `variables` has them); the
    `variables`; and `add_generation_prompt`.

    Raises:
        FeatureUnavailableError: jinja2 >= 3.1.6 is not installed.
        CheckpointError: the template is not valid Jinja.
        PromptError: messages that are not a list of dicts, or a template that refuses them or fails on them.
    """
    jinja2 = _import_jinja2()
    compiled = _compile_chat_template(template)
    context = {"tools": None, "documents": None, **_template_data(variables or {}),
               "messages": _template_messages(messages), "add_generation_prompt": add_generation_prompt}
    try:
        return compiled.render(**context)
    except (jinja2.TemplateError, TypeError, ValueError) as error:
        raise PromptError(f"the chat template cannot render these messages: {error} (messages are dicts such as "
                          "{\"role\": \"user\", \"content\": [{\"type\": \"text\", \"text\": \"...\"}]}; a message "
                          "from the template itself says what it refuses)") from None


def _import_jinja2():
    """jinja2, imported here: the base install does not depend on it.

    Raises:
        FeatureUnavailableError: it is missing or older than MIN_JINJA2.
    """
    try:
        import jinja2
    except ImportError:
        raise FeatureUnavailableError("chat templates need jinja2, which the base install of flamingo-edge does not "
                                      "have; install it with: pip install 'flamingo-edge[chat]' (or write the prompt's "
                                      "items yourself)") from None
    version = tuple(int(part) for part in re.findall(r"\d+", jinja2.__version__)[:3])
    if version < MIN_JINJA2:
        raise FeatureUnavailableError(f"chat templates need jinja2 >= 3.1.6, whose sandbox has no known escape (a "
                                      f"template is code from the checkpoint); this machine has {jinja2.__version__}: "
                                      "pip install -U 'jinja2>=3.1.6'")
    return jinja2


@lru_cache(maxsize=8)
def _compile_chat_template(template: str):
    """The compiled template, in `_sandbox()`.

    Raises:
        CheckpointError: a syntax error, with its line.
    """
    jinja2 = _import_jinja2()
    try:
        return _sandbox(jinja2).from_string(template)
    except jinja2.TemplateSyntaxError as error:
        raise CheckpointError(f"the chat template is not valid Jinja (line {error.lineno}: {error.message}); fix "
                              f"the checkpoint's {CHAT_TEMPLATE_FILE}, or pass a template as chat_template=") from None


def _sandbox(jinja2):
    """The environment transformers renders chat templates in, rebuilt (jinja2 is imported by the caller)."""
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """`{% generation %}...{% endgeneration %}` marks the assistant's text for transformers' assistant mask;
        here the body renders unchanged, in a scope of its own (a call block, as in transformers)."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template cannot set {name!r} on a namespace: names "
                                                  "starting with '_' could reach Python's internals")

    class Namespace(jinja2.utils.Namespace):
        """jinja2's `namespace()`, refusing names that start with "_"."""

        def __init__(*args, **kwargs):  # self in *args, so that namespace(self=...) works, as in jinja2
            for name in dict(*args[1:], **kwargs):
                check_name(name)
            jinja2.utils.Namespace.__init__(*args, **kwargs)

        def __setitem__(self, name, value):
            check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[GenerationTag, loopcontrols])
    environment.filters["tojson"] = _tojson
    environment.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                               dict=_TemplateDict(), namespace=Namespace)
    return environment


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """A template's `tojson`: json.dumps, without jinja2's HTML escaping."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _TemplateDict:
    """A template's `dict(...)` and `dict.fromkeys(...)`, without giving it the `dict` type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _template_data(value: Any) -> Any:
    """`value` rebuilt from plain data, as transformers hands it to a template: str, int, float, bool and None
    (subclasses, numpy scalars included, become the base type), dicts, lists and tuples, dataclasses and pydantic
    models as dicts, anything else (an image array) the text "<TypeName>". A sandboxed template then reaches no
    object's methods."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)  # str() would call a subclass's __str__ (an Enum's gives its name)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_template_data(key): _template_data(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_template_data(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_template_data(item) for item in value)
    if isinstance(value, np.generic):
        return _template_data(value.item())
    if is_dataclass(value) and not isinstance(value, type):
        return {field.name: _template_data(getattr(value, field.name)) for field in fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _template_data(value.model_dump())
    return f"<{type(value).__name__}>"


def _template_messages(messages: Any) -> list[dict]:
    """The messages as a template sees them: plain data, keys whose value is None left out (transformers drops
    them: templates test for a key, not for None), and reasoning under every name of REASONING_KEYS that templates
    read ("thinking" first, "reasoning_content" last, as transformers orders them).

    Raises:
        PromptError: not a non-empty list of dicts.
    """
    if not isinstance(messages, (list, tuple)) or not messages or not all(isinstance(m, Mapping) for m in messages):
        raise PromptError(f"messages must be one conversation, a non-empty list of dicts such as {{\"role\": \"user\", "
                          f"\"content\": [{{\"type\": \"image\", \"image\": array}}, {{\"type\": \"text\", \"text\": "
                          f"\"Describe it.\"}}]}}; got {messages!r:.80}")
    plain = []
    for message in messages:
        message = _template_data({key: value for key, value in message.items() if value is not None})
        reasoning = next((message[key] for key in REASONING_KEYS if message.get(key) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        plain.append(message)
    return plain


def message_images(messages: list) -> list[np.ndarray]:
    """The arrays of the messages' image blocks ({"type": "image"} or "image_url"), in order: transformers pairs
    them in this order with the image tokens of the rendered text.

    Raises:
        PromptError: an image block without a numpy array under "image".
    """
    images = []
    for index, message in enumerate(messages):
        content = message.get("content")
        for position, block in enumerate(content if isinstance(content, (list, tuple)) else ()):
            if not isinstance(block, Mapping) or block.get("type") not in ("image", "image_url"):
                continue
            if not isinstance(block.get("image"), np.ndarray):
                raise PromptError(f"message {index}, content {position} is an image block without its pixels; give "
                                  "it as {\"type\": \"image\", \"image\": array}, a uint8 numpy array "
                                  "(load_image(path) or np.asarray(pil_image)): URLs and paths are not fetched")
            images.append(block["image"])
    return images
