"""`vlmserve shutdown`: stop the Ray Serve applications and the local Ray cluster `vlmserve run` started
(deploy/cluster.py).
"""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "shutdown", help="stop the Ray Serve applications and the local Ray cluster `vlmserve run` started"
    )
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    p.add_argument(
        "--address", default=None, metavar="HOST:PORT", help="(default: the cluster `vlmserve run` started)"
    )
    p.set_defaults(handler=shutdown, parser=p)


def shutdown(args: argparse.Namespace) -> int:
    from vlmserve.deploy import cluster

    try:
        return cluster.shutdown(address=args.address, yes=args.yes, record_path=cluster.default_record_path())
    except RuntimeError as e:
        print(f"vlmserve shutdown: error: {e}", file=sys.stderr)
        return 1
