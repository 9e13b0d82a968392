"""`kontext-lora operator`: parse the command line, load the operator config, serve metrics, run kopf.

High availability: replicas share one ClusterKopfPeering (`--peering`, default `kontext-lora`, shipped in
deploy/kopf-peering.yaml) and only the highest `--priority` acts; the others stand by. Without `--priority`,
each replica's priority is derived from its start time so that the oldest acts and a rolling update's new pod
takes over only when the old one has gone (kopf pauses *all* replicas of equal priority). `--standalone` runs
a single replica without peering.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import random
import socket
import string
import sys
import time
from pathlib import Path

import kopf

from kontext_lora.api.operator_config import CONFIG_ENV, OperatorConfig, load_operator_config

from . import metrics
from .peering import PeeringIdentity

DEFAULT_PEERING = "kontext-lora"
LOG_FORMATS = {"plain": kopf.LogFormat.PLAIN, "full": kopf.LogFormat.FULL, "json": kopf.LogFormat.JSON}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kontext-lora operator",
        description="Run the KontextLoRAJob operator (kopf) against the current kubeconfig or in-cluster identity.",
    )
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "-n",
        "--namespace",
        action="append",
        dest="namespaces",
        metavar="NAMESPACE",
        help="Namespace (or glob pattern) to serve; repeatable. Default: watchNamespaces of the config, else all.",
    )
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="Serve every namespace.")
    peering = parser.add_mutually_exclusive_group()
    peering.add_argument("--standalone", action="store_true", help="Single replica: no peering.")
    peering.add_argument(
        "--peering", default=DEFAULT_PEERING, metavar="NAME", help="ClusterKopfPeering shared by the replicas."
    )
    parser.add_argument(
        "--priority", type=int, default=None, help="Peering priority; the highest acts (default: oldest replica)."
    )
    parser.add_argument(
        "--config", type=Path, default=None, help=f"Operator config file (default: ${CONFIG_ENV} or built-ins)."
    )
    parser.add_argument("--log-format", choices=sorted(LOG_FORMATS), default="full")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true")
    verbosity.add_argument("-d", "--debug", action="store_true")
    verbosity.add_argument("-q", "--quiet", action="store_true")
    return parser


def default_priority(now: float | None = None) -> int:
    """Older replicas get higher priorities (negated start time in milliseconds)."""
    return -int((time.time() if now is None else now) * 1000)


def peering_identity() -> str:
    """kopf's identity for this replica ($POD_ID, else $POD_NAME, else one made up as kopf would), exported as
    $POD_ID so that kopf and the operator's own peering gate (peering.py) use the same one."""
    identity = os.environ.get("POD_ID") or os.environ.get("POD_NAME")
    if not identity:
        now = time.strftime("%Y%m%d%H%M%S", time.gmtime())
        suffix = "".join(random.choices(string.ascii_lowercase + string.digits, k=3))
        identity = f"{getpass.getuser()}@{socket.gethostname()}/{now}/{suffix}"
    os.environ["POD_ID"] = identity
    return identity


def run_operator(args: list[str]) -> int:
    options = build_parser().parse_args(args)
    if options.config is not None and not options.config.exists():
        print(f"error: {options.config}: no such file", file=sys.stderr)
        return 2
    try:
        config: OperatorConfig = load_operator_config(options.config)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    identity = peering_identity()
    namespaces = [] if options.all_namespaces else (options.namespaces or list(config.watch_namespaces))
    priority = (
        None if options.standalone else (options.priority if options.priority is not None else default_priority())
    )
    kopf.configure(
        debug=options.debug, verbose=options.verbose, quiet=options.quiet, log_format=LOG_FORMATS[options.log_format]
    )
    from . import handlers  # noqa: F401  (registers the handlers)

    try:
        metrics.serve(config.metrics_port)
    except OSError as error:
        print(f"error: cannot serve metrics on port {config.metrics_port}: {error}", file=sys.stderr)
        return 1
    logging.getLogger("kontext_operator").info(
        "serving %s; metrics on :%d/metrics, health on :%d/healthz",
        ", ".join(namespaces) or "all namespaces",
        config.metrics_port,
        config.health_port,
    )
    kopf.run(
        standalone=True if options.standalone else None,
        peering_name=None if options.standalone else options.peering,
        priority=priority,
        clusterwide=not namespaces,
        namespaces=namespaces,
        liveness_endpoint=f"http://0.0.0.0:{config.health_port}/healthz",
        memo=kopf.Memo(
            config=config,
            namespaces=namespaces,
            peering=None if priority is None else PeeringIdentity(options.peering, identity, priority),
        ),
    )
    return 0
