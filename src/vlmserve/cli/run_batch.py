"""`vlmserve run-batch`: an OpenAI batch file through an engine of this process, or against a server
(--url). The job itself is api/batch.py's; this module wires its flags and the engine flags.
"""

from __future__ import annotations

import argparse

from vlmserve.cli.engine_args import add_engine_args, engine_args_from


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from vlmserve.api import batch

    p = batch.add_parser(subparsers, add_engine_args)
    p.set_defaults(handler=run_batch, parser=p)


def run_batch(args: argparse.Namespace) -> int:
    from vlmserve.api import batch

    engine_args = None
    if args.url is None:
        model = args.model_source or args.model_flag
        if model is not None:
            args.model = model
        engine_args = engine_args_from(args, args.parser)
    return batch.main(args, engine_args)
