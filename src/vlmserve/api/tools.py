"""Tool calling: what `tools` / `tool_choice` ask of a request, the grammar that enforces a forced call, and
the Hermes-style parser that turns `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks in the
model's text into OpenAI `tool_calls`, whole or as stream deltas (the name first, then argument pieces).

Qwen2.5(-VL) writes tool calls this way (models/tool_template.py renders them back into the prompt), which is
what vLLM's `--tool-call-parser hermes` reads. `tool_choice`:
  none      tools are shown to the model, nothing is parsed;
  auto      the output is parsed; needs the server's --enable-auto-tool-choice --tool-call-parser hermes;
  required  the output is constrained to one or more calls (one without parallel_tool_calls) of the tools,
            arguments matching each function's parameter schema (a llguidance Lark grammar of %json blocks);
  named     the same for one function, one call.

Does not know: the engine, HTTP, SSE framing. No torch.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from vlmserve.api.errors import InvalidRequestError
from vlmserve.api.protocol import (
    ChatCompletionRequest,
    DeltaFunctionCall,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
)
from vlmserve.engine.sampling_params import StructuredOutputsParams
from vlmserve.engine.structured import StructuredOutputError, check_structured_outputs

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
TOOL_CALL_PARSERS = ("hermes",)
_ANY_ARGUMENTS: dict[str, Any] = {"type": "object"}
_CALL_JSON_FORMAT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def new_tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


@dataclass(frozen=True)
class ToolPlan:
    """What a chat request's tools mean for its generation and its answer."""

    parse: bool = False  # read tool calls out of the output
    constraint: StructuredOutputsParams | None = None  # for required / named choices
    parallel: bool = True  # more than one call allowed
    named: bool = False  # a named tool_choice: finish_reason stays "stop", as OpenAI answers


def plan_tools(
    body: ChatCompletionRequest, *, enable_auto_tool_choice: bool, tool_call_parser: str | None
) -> ToolPlan:
    """Check `tools` / `tool_choice` / `parallel_tool_calls` and say what to do; InvalidRequestError names
    the field that is wrong."""
    tools = body.tools or []
    choice = body.tool_choice
    parallel = body.parallel_tool_calls is not False
    if not tools:
        if choice not in (None, "none"):
            raise InvalidRequestError(
                f"tool_choice {_show(choice)} needs 'tools'; send the functions the model may call.",
                param="tool_choice",
            )
        return ToolPlan()
    names = [t.function.name for t in tools]
    if choice is None:
        choice = "auto"
    if choice == "none":
        return ToolPlan()
    if choice == "auto":
        if not (enable_auto_tool_choice and tool_call_parser):
            raise InvalidRequestError(
                '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set on '
                "the server; ask the operator, or use tool_choice 'required', a named function or 'none'.",
                param="tool_choice",
            )
        return ToolPlan(parse=True, parallel=parallel)
    if choice == "required":
        return ToolPlan(
            parse=True, constraint=_calls_constraint(body, range(len(tools)), parallel), parallel=parallel
        )
    if isinstance(choice, dict) and choice.get("type") == "function":
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if name not in names:
            raise InvalidRequestError(
                f"tool_choice names the function {name!r}, which is not in 'tools' ({', '.join(names)}).",
                param="tool_choice",
            )
        index = names.index(name)
        return ToolPlan(
            parse=True, constraint=_calls_constraint(body, [index], False), parallel=False, named=True
        )
    raise InvalidRequestError(
        f"tool_choice {_show(choice)} is not supported; use 'none', 'auto', 'required' or "
        '{"type": "function", "function": {"name": "..."}}.',
        param="tool_choice",
    )


def output_plan(body: ChatCompletionRequest) -> ToolPlan:
    """How to read a request's output (parse or not, how many calls, named): `plan_tools` without its checks
    or grammar, for the side that only formats the answer (the request was checked when it was prepared)."""
    tools = body.tools or []
    choice = body.tool_choice if body.tool_choice is not None else "auto"
    if not tools or choice == "none":
        return ToolPlan()
    named = isinstance(choice, dict)
    return ToolPlan(parse=True, parallel=body.parallel_tool_calls is not False and not named, named=named)


def finish_reason(reason: str | None, plan: ToolPlan, called: bool) -> str | None:
    """OpenAI's finish_reason once tools are read: "tool_calls" when the model called a tool and stopped
    (a named choice answers "stop", as OpenAI does)."""
    if called and reason == "stop" and not plan.named:
        return "tool_calls"
    return reason


def _show(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else repr(value)


def _calls_constraint(body: ChatCompletionRequest, indices: Any, parallel: bool) -> StructuredOutputsParams:
    """A grammar for Hermes calls of the tools at `indices`: each call's JSON is a schema with the name as a
    constant and the function's parameters as the arguments' schema."""
    tools = body.tools or []
    rules = []
    for i in indices:
        function = tools[i].function
        parameters = function.parameters if function.parameters is not None else _ANY_ARGUMENTS
        param = f"tools[{i}].function.parameters"
        try:  # each schema on its own first, so that a bad one is named
            check_structured_outputs(StructuredOutputsParams(json=parameters))
        except (StructuredOutputError, ValueError) as e:
            raise InvalidRequestError(f"{param}: {e}", param=param) from e
        schema = {
            # Qwen2.5's own spacing ({"name": "f", "arguments": {...}}); no free whitespace to wander in.
            "x-guidance": _CALL_JSON_FORMAT,
            "type": "object",
            "properties": {"name": {"const": function.name}, "arguments": parameters},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        rules.append(f"fn_{i}: %json {json.dumps(schema, ensure_ascii=False)}")
    alternatives = " | ".join(f"fn_{i}" for i in indices)
    repeat = ' ("\\n" call)*' if parallel else ""
    grammar = "\n".join(
        [
            f"start: call{repeat}",
            f'call: "{TOOL_CALL_START}\\n" body "\\n{TOOL_CALL_END}"',
            f"body: {alternatives}",
            *rules,
        ]
    )
    constraint = StructuredOutputsParams(grammar=grammar)
    try:  # all of them together (size limits)
        check_structured_outputs(constraint)
    except StructuredOutputError as e:
        raise InvalidRequestError(f"the tools cannot be enforced together: {e}", param="tools") from e
    return constraint


# ------------------------------------------------------------------------------------------ parsing


_NAME = re.compile(r'^\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*', re.DOTALL)


def parse_tool_calls(text: str, parallel: bool = True) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a finished output. Content is the text outside the calls (None when empty);
    a block that is not JSON with a name stays in the content. Arguments are JSON text, as OpenAI sends."""
    calls: list[ToolCall] = []
    content_parts: list[str] = []
    pos = 0
    while True:
        start = text.find(TOOL_CALL_START, pos)
        if start < 0:
            content_parts.append(text[pos:])
            break
        end = text.find(TOOL_CALL_END, start)
        body_end = end if end >= 0 else len(text)
        call = _parse_call(text[start + len(TOOL_CALL_START) : body_end])
        if call is None:
            content_parts.append(text[pos : body_end + (len(TOOL_CALL_END) if end >= 0 else 0)])
        else:
            content_parts.append(text[pos:start])
            if parallel or not calls:
                calls.append(call)
        if end < 0:
            break
        pos = end + len(TOOL_CALL_END)
    content = "".join(content_parts).strip() if calls else "".join(content_parts)
    return (content or None), calls


def _parse_call(body: str) -> ToolCall | None:
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    arguments = data.get("arguments", data.get("parameters", {}))
    return ToolCall(
        id=new_tool_call_id(),
        function=FunctionCall(name=data["name"], arguments=json.dumps(arguments, ensure_ascii=False)),
    )


@dataclass
class _StreamCall:
    index: int
    named: bool = False
    arguments_sent: int = 0  # characters of the raw arguments text streamed so far


@dataclass
class ToolCallStream:
    """Incremental Hermes parser for one choice's stream: feed text deltas, get (content, tool call deltas).

    Outside a call, text streams as content, except a tail that may be the start of `<tool_call>` (held until
    it is known). Inside one: the call's header (id, type, name) goes out once its name is complete, then
    the raw arguments text as it arrives, minus the part from its last "}" on (that may be the closing brace
    of the call object); when `</tool_call>` arrives the rest of the arguments follows.
    """

    parallel: bool = True
    calls: list[_StreamCall] = field(default_factory=list)
    _buffer: str = ""
    _in_call: bool = False

    @property
    def called(self) -> bool:
        return bool(self.calls)

    def feed(self, text: str, final: bool = False) -> tuple[str, list[DeltaToolCall]]:
        self._buffer += text
        content: list[str] = []
        deltas: list[DeltaToolCall] = []
        while True:
            if not self._in_call:
                start = self._buffer.find(TOOL_CALL_START)
                if start < 0:
                    keep = 0 if final else _partial_suffix(self._buffer, TOOL_CALL_START)
                    content.append(self._buffer[: len(self._buffer) - keep])
                    self._buffer = self._buffer[len(self._buffer) - keep :]
                    break
                content.append(self._buffer[:start])
                self._buffer = self._buffer[start + len(TOOL_CALL_START) :]
                self._in_call = True
                continue
            end = self._buffer.find(TOOL_CALL_END)
            body = self._buffer if end < 0 else self._buffer[:end]
            deltas += self._call_deltas(body, closed=end >= 0 or final)
            if end < 0:
                break
            self._buffer = self._buffer[end + len(TOOL_CALL_END) :]
            self._in_call = False
            if self.calls and not self.calls[-1].named:
                self.calls.pop()  # a block with no readable name: nothing was sent for it
        joined = "".join(content)
        if self.calls and not joined.strip():
            joined = ""
        return joined, deltas

    def _call_deltas(self, body: str, closed: bool) -> list[DeltaToolCall]:
        if not self.calls or self.calls[-1].arguments_sent < 0:
            self.calls.append(_StreamCall(index=len(self.calls)))
        call = self.calls[-1]
        out: list[DeltaToolCall] = []
        match = _NAME.match(body)
        if not call.named:
            if match is None:
                if closed:
                    parsed = _parse_call(body)
                    call.arguments_sent = -1  # done
                    if parsed is not None and (self.parallel or call.index == 0):
                        call.named = True
                        out.append(
                            DeltaToolCall(
                                index=call.index,
                                id=parsed.id,
                                type="function",
                                function=DeltaFunctionCall(
                                    name=parsed.function.name, arguments=parsed.function.arguments
                                ),
                            )
                        )
                return out
            call.named = True
            if self.parallel or call.index == 0:
                out.append(
                    DeltaToolCall(
                        index=call.index,
                        id=new_tool_call_id(),
                        type="function",
                        function=DeltaFunctionCall(name=json.loads(f'"{match.group(1)}"'), arguments=""),
                    )
                )
        if match is None:
            return out
        arguments = body[match.end() :]
        if closed:
            brace = arguments.rfind("}")
            upto = arguments[:brace].rstrip() if brace >= 0 else arguments.rstrip()
        else:
            brace = arguments.rfind("}")
            upto = arguments[:brace].rstrip() if brace >= 0 else ""
            # Without any "}" yet, a scalar or an unclosed object streams all but trailing space.
            if brace < 0:
                upto = arguments.rstrip() if arguments.lstrip().startswith("{") else ""
        piece = upto[call.arguments_sent :] if len(upto) > call.arguments_sent else ""
        if piece and (self.parallel or call.index == 0):
            out.append(DeltaToolCall(index=call.index, function=DeltaFunctionCall(arguments=piece)))
        call.arguments_sent = max(call.arguments_sent, len(upto))
        if closed:
            call.arguments_sent = -1
        return out


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
