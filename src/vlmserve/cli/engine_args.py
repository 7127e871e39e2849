"""Engine flags for every command that builds an engine (serve, run-batch), generated from `EngineArgs`
(config.py): each field has exactly one flag, named like the field (`max_num_seqs` -> `--max-num-seqs`), and
only the flags given on the command line reach EngineArgs (its defaults stay the single source of defaults).
Also the value parsers the commands share, whose errors name the value.

Does not know: what a command does with the EngineArgs.
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from vlmserve.config import EngineArgs

# Flags that differ from the field name (vLLM has two names for the served model id).
_FLAG_NAMES: dict[str, tuple[str, ...]] = {
    "served_model_name": ("--served-model-name", "--model-id"),
    "quantization": ("--quantization", "-q"),
    "tensor_parallel_size": ("--tensor-parallel-size", "-tp"),
}


def _flags(field: str) -> tuple[str, ...]:
    return _FLAG_NAMES.get(field, ("--" + field.replace("_", "-"),))


def integer(value: str) -> int:
    # argparse reports a ValueError from a type function under the function's name; say what was wrong.
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None


def port(value: str) -> int:
    port = integer(value)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port (0-65535)")
    return port


def positive_int(value: str) -> int:
    number = integer(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return number


def positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return number


def _flag_kind(annotation: Any) -> tuple[Callable[[str], Any] | None, list[str] | None]:
    """(argparse type, choices) for an EngineArgs field type; (None, None) means a boolean switch."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    if annotation is bool:
        return None, None
    if typing.get_origin(annotation) is typing.Literal:
        return str, [str(a) for a in typing.get_args(annotation)]
    if annotation in (int, float, str):
        return annotation, None
    # dicts (limit_mm_per_prompt, mm_processor_kwargs): a JSON string, parsed and checked by EngineArgs.
    return str, None


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """One flag per EngineArgs field (except the positional model); defaults stay EngineArgs'."""
    group = parser.add_argument_group("engine options (EngineArgs; vLLM names)")
    for name, field in EngineArgs.model_fields.items():
        if name == "model":
            continue
        kind, choices = _flag_kind(field.annotation)
        default = field.get_default(call_default_factory=True)
        shown = json.dumps(default) if isinstance(default, dict) else default
        help_text = field.description or name.replace("_", " ")
        if default is not None:
            help_text += f" (default: {shown})"
        if kind is None:
            group.add_argument(
                *_flags(name),
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        else:
            group.add_argument(
                *_flags(name),
                dest=name,
                type=kind,
                choices=choices,
                default=argparse.SUPPRESS,
                metavar=None if choices else name.upper(),
                help=help_text,
            )


def engine_args_from(args: argparse.Namespace, parser: argparse.ArgumentParser) -> EngineArgs:
    """EngineArgs from the flags that were given; a validation error exits 2 naming the flag."""
    given = {name: getattr(args, name) for name in EngineArgs.model_fields if hasattr(args, name)}
    try:
        return EngineArgs(**given)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            field = str(err["loc"][0]) if err["loc"] else ""
            flag = "/".join(_flags(field)) if field in EngineArgs.model_fields else "arguments"
            message = str(err["msg"]).removeprefix("Value error, ")
            problems.append(f"argument {flag}: {message} (got {err.get('input')!r})")
        parser.error("; ".join(problems))
