"""`vlmserve run`: deploy a Ray Serve config (or a model) on a local or joined Ray cluster
(deploy/cluster.py does the work; errors exit with status 1 and say why).
"""

from __future__ import annotations

import argparse
import sys

from vlmserve.cli.engine_args import port, positive_int


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "run",
        help="deploy on Ray Serve: a built app (module:app) or a Serve YAML file",
        description="Deploy on Ray Serve. TARGET is a Serve YAML file (applications: [{name, route_prefix, "
        "import_path: vlmserve:build_openai_app, args: {llm_configs: [...]}}]) or module:app, an application "
        "built with vlmserve.build_openai_app. Without --address, starts a local Ray cluster (or reuses the "
        "one an earlier `vlmserve run` started).",
    )
    p.add_argument("target", metavar="TARGET", help="config.yaml or module:app (e.g. serve_qwen_VL:app)")
    p.add_argument(
        "--non-blocking",
        action="store_true",
        help="return once the applications are RUNNING and leave them serving (stop: vlmserve shutdown -y)",
    )
    p.add_argument(
        "--address", default=None, metavar="HOST:PORT", help="join this Ray cluster instead of a local one"
    )
    p.add_argument(
        "--host", default=None, help="HTTP address (default: the file's http_options.host, else 127.0.0.1)"
    )
    p.add_argument(
        "--port",
        type=port,
        default=None,
        help="HTTP port (default: the file's http_options.port, else 8000)",
    )
    p.add_argument(
        "--no-direct-ingress",
        dest="direct_ingress",
        action="store_false",
        help="serve through Ray Serve's HTTP proxy even where the application's ingress replica could serve "
        "HTTP itself (a local cluster started for one application; the default there)",
    )
    p.add_argument(
        "--num-cpus",
        type=positive_int,
        default=None,
        help="CPUs of a local cluster started here (default: this machine's cores)",
    )
    p.set_defaults(handler=run, parser=p)


def run(args: argparse.Namespace) -> int:
    from vlmserve.deploy import cluster

    try:
        return cluster.run(
            args.target,
            address=args.address,
            non_blocking=args.non_blocking,
            host=args.host,
            port=args.port,
            num_cpus=args.num_cpus,
            record_path=cluster.default_record_path(),
            direct_ingress=args.direct_ingress,
        )
    except (RuntimeError, ValueError) as e:  # ClusterError, config errors, a failed deployment
        print(f"vlmserve run: error: {e}", file=sys.stderr)
        return 1
