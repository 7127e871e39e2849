"""The `vlmserve` command: one module per subcommand, flags with the names vLLM users already type.

    vlmserve serve [MODEL_SOURCE] --model-id NAME --host 127.0.0.1 --port 8000 --max-model-len 4096 ...

    serve.py       the OpenAI-compatible HTTP server
    run_batch.py   an OpenAI batch file, offline or against a server
    run.py         deploy on Ray Serve; status.py, shutdown.py: inspect and stop it
    bench.py       load a running server and measure it
    engine_args.py the engine flags, generated from EngineArgs, and the value parsers the commands share

To add a subcommand, write a module with `add_parser(subparsers)` that registers its flags and
`set_defaults(handler=..., parser=p)`, and list it in `SUBCOMMANDS`. Flag errors exit with status 2 and
name the flag; a command that fails for another reason returns 1 and says why.

Does not know: how engines, apps or servers work inside (api/server.py, api/serving.py do).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from vlmserve import __version__, envs
from vlmserve.cli import bench, run, run_batch, serve, shutdown, status
from vlmserve.cli.engine_args import add_engine_args, engine_args_from
from vlmserve.cli.serve import api_keys as _api_keys

__all__ = ["SUBCOMMANDS", "_api_keys", "add_engine_args", "build_parser", "engine_args_from", "envs", "main"]

SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    serve.add_parser,
    run_batch.add_parser,
    run.add_parser,
    status.add_parser,
    shutdown.add_parser,
    bench.add_parser,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlmserve", description="Serve vision-language models behind an OpenAI-compatible API."
    )
    parser.add_argument("--version", action="version", version=f"vlmserve {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)
