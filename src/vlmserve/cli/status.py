"""`vlmserve status`: the Ray Serve applications and their replicas (deploy/cluster.py)."""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("status", help="show the Ray Serve applications and their replicas")
    p.add_argument(
        "--address", default=None, metavar="HOST:PORT", help="(default: the cluster `vlmserve run` started)"
    )
    p.set_defaults(handler=status, parser=p)


def status(args: argparse.Namespace) -> int:
    from vlmserve.deploy import cluster

    try:
        return cluster.status(address=args.address, record_path=cluster.default_record_path())
    except RuntimeError as e:
        print(f"vlmserve status: error: {e}", file=sys.stderr)
        return 1
