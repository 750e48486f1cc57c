"""Chat templates: render a conversation to text as Hugging Face tokenizers do (`apply_chat_template`).

A model's chat template is a jinja2 program shipped with its tokenizer (`tokenizer.chat_template` in a GGUF
file, `chat_template` in a Hugging Face `tokenizer_config.json`); the importer keeps it in the store's
manifest (`extra["chat_template"]`). It is compiled here exactly as `transformers` compiles it: a sandboxed,
immutable jinja2 environment with `trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension, a
`raise_exception` global, `strftime_now`, a `tojson` filter that keeps non-ASCII text, and the `{% generation %}`
block some templates use to mark assistant text (rendered as its plain content). The render variables are
`messages`, `add_generation_prompt`, and the tokenizer's special tokens `bos_token` and `eos_token`.

A store without a template (the byte-level `tiny` default, a model imported without one) uses
`DEFAULT_CHAT_TEMPLATE`, ChatML: `<|im_start|>ROLE\\nCONTENT<|im_end|>\\n` per message, the format SmolLM2,
Qwen and many others use.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox

from sct_edge.errors import SctError

# ChatML, as SmolLM2's own template minus its default system prompt.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: transformers uses it to find assistant text; here the
    body renders as it is (sct-edge finds assistant text by rendering prefixes, see `examples.py`)."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@dataclass
class ChatTemplate:
    """A compiled chat template with the special-token strings it is rendered with.

    `source` names where the template came from (a store path, "the default ChatML template") for errors."""

    text: str
    source: str
    bos_token: str = ""
    eos_token: str = ""

    def __post_init__(self) -> None:
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._compiled = env.from_string(self.text)
        except jinja2.exceptions.TemplateSyntaxError as error:
            raise SctError(f"{self.source}: the chat template does not compile (line {error.lineno}: {error.message})"
                           ) from None

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """The conversation as text. A template error (its own `raise_exception`, an undefined name, a type
        error inside it) is a `jinja2.TemplateError` or a Python exception; `render_or_fail` turns it into a
        SctError that names the data line."""
        return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token, eos_token=self.eos_token)

    def render_or_fail(self, messages: list[dict[str, str]], add_generation_prompt: bool, where: str) -> str:
        """`render`, with any failure reported as a one-line SctError starting with `where` (FILE:LINE)."""
        try:
            return self.render(messages, add_generation_prompt)
        except Exception as error:  # jinja2 and the template's own code may raise anything
            raise SctError(f"{where}: the chat template ({self.source}) failed to render this conversation: "
                           f"{type(error).__name__}: {error}") from None


def special_token_text(tokenizer: Any, token_id: int | None) -> str:
    """The text of special token `token_id` in a BPE tokenizer ("" for None or the byte tokenizer)."""
    if token_id is None or getattr(tokenizer, "kind", None) != "bpe":
        return ""
    return tokenizer.tokenizer.id_to_token(int(token_id)) or ""


def chat_template_for(template_text: str | None, tokenizer: Any, source: str) -> ChatTemplate:
    """The model's own template (`template_text`, e.g. `store.extra.get("chat_template")`) or, without one,
    the default ChatML template; rendered with `tokenizer`'s BOS and EOS token strings."""
    if template_text is None:
        template_text, source = DEFAULT_CHAT_TEMPLATE, "the default ChatML template"
    return ChatTemplate(template_text, source, bos_token=special_token_text(tokenizer, tokenizer.bos_id),
                        eos_token=special_token_text(tokenizer, tokenizer.eos_id))
