"""Chat templates rendered the way HF renders them: the sandboxed jinja environment (HF's globals, filters and
the `{% generation %}` tag), the one normalisation of OpenAI / HF chat messages into what templates expect,
and the choice of a tools template for conversations that use tools.

Owns: compiling and rendering a template, and the messages it sees (plain JSON-like data only). Does not
know: where a template comes from (processor.py reads the checkpoint's files), tokens or images.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

from vlmserve.models.tool_template import QWEN2_5_VL_TOOLS_CHAT_TEMPLATE, template_handles_tools


class _GenerationTag(jinja2.ext.Extension):
    """Accept `{% generation %}...{% endgeneration %}` (used by some templates to mark assistant tokens for
    training masks) and render its body unchanged, as HF does when it is not tracking those masks."""

    tags = {"generation"}  # noqa: RUF012 (jinja's own class attribute)

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return str(caller())


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja's namespace, minus underscore-prefixed attributes (HF's guard against sandbox escapes)."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        # Same signature trick as jinja's Namespace so that `namespace(self=...)` still works.
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"Chat templates cannot store underscore-prefixed attributes on a namespace, got {name!r}."
            )


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Like HF's override: jinja's built-in tojson HTML-escapes, which would change the prompt.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def uses_tools(messages: Sequence[Mapping[str, Any]], tools: Sequence[Any] | None) -> bool:
    """Whether a conversation needs a template that renders tools: tool definitions, an assistant turn with
    tool_calls, or a tool result."""
    return bool(tools) or any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in the environment HF renders chat templates in (sandboxed, trim_blocks,
    lstrip_blocks, loop controls, the same globals and filters), so the same messages render the same text."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _TemplateNamespace
    env.globals["dict"] = dict
    return env.from_string(source)


def _plain(value: Any) -> Any:
    # The template sees only JSON-like data: rich objects (decoded images, arrays) become an inert "<Type>"
    # placeholder, as in HF. Templates test whether media keys are present, never read their values.
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return _plain(value.item())
    return f"<{type(value).__name__}>"


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI / HF chat messages as chat templates expect them, the one place this is done: what HF's
    processor does before rendering (drop keys whose value is None, as OpenAI clients send `content: null`;
    turn OpenAI {"type": "image_url", "image_url": ...} parts into {"type": "image"}), plus OpenAI's
    spellings templates do not know: the `developer` role is `system`, and tool-call arguments sent as JSON
    text become the mapping templates write with `| tojson`."""
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TypeError(
                f"messages[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}."
            )
        msg = {k: v for k, v in message.items() if v is not None}
        if msg.get("role") == "developer":
            msg["role"] = "system"
        if isinstance(msg.get("tool_calls"), list):
            msg["tool_calls"] = [_tool_call(call) for call in msg["tool_calls"]]
        content = msg.get("content")
        if isinstance(content, list):
            parts: list[Any] = []
            for part in content:
                if isinstance(part, Mapping) and part.get("type") == "image_url" and "image_url" in part:
                    info = part["image_url"]
                    url = info.get("url", "") if isinstance(info, Mapping) else info
                    parts.append({"type": "image", "url": url})
                else:
                    parts.append(part)
            msg["content"] = parts
        out.append(_plain(msg))
    return out


def _tool_call(call: Any) -> Any:
    function = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(function, Mapping) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except json.JSONDecodeError:
        return call  # not JSON: the template writes it as a string
    return {**call, "function": {**function, "arguments": arguments}}


class ChatTemplate:
    """A checkpoint's chat template, compiled once, with the special tokens HF passes to it."""

    def __init__(self, source: str, special_tokens: Mapping[str, str] | None = None) -> None:
        self.source = source
        self._template = compile_chat_template(source)
        self._tools_template: jinja2.Template | None = None
        self._special_tokens = dict(special_tokens or {})

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render `messages` (HF / OpenAI chat format); the same text as HF's `apply_chat_template`. Extra
        kwargs (e.g. add_vision_id=True) reach the template."""
        return self._render(self._template, messages, add_generation_prompt, tools, documents, kwargs)

    def render_with_tools(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """As `render`, for a conversation that uses tools: the checkpoint's template when it renders tools,
        else the Hermes-style template of models/tool_template.py (compiled on first use)."""
        template = self._template
        if not template_handles_tools(self.source):
            if self._tools_template is None:
                self._tools_template = compile_chat_template(QWEN2_5_VL_TOOLS_CHAT_TEMPLATE)
            template = self._tools_template
        return self._render(template, messages, add_generation_prompt, tools, None, kwargs)

    def _render(
        self,
        template: jinja2.Template,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool,
        tools: list[dict[str, Any]] | None,
        documents: list[dict[str, Any]] | None,
        kwargs: dict[str, Any],
    ) -> str:
        if not messages:
            raise ValueError(
                "Cannot apply the chat template to an empty conversation; pass at least one message."
            )
        template_kwargs = {**self._special_tokens, **_plain(kwargs)}
        return template.render(
            messages=normalize_messages(messages),
            tools=_plain(tools),
            documents=_plain(documents),
            add_generation_prompt=add_generation_prompt,
            **template_kwargs,
        )
