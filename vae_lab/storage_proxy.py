"""`python -m vae_lab.storage_proxy`: one process that talks to the Optuna database for every
sweep worker, so that hundreds of workers hold a few database connections instead of one or
more each (PostgreSQL's "too many clients").

    python -m vae_lab.storage_proxy --storage postgresql://user:pw@db/optuna
    # Optuna storage postgresql://user:***@db/optuna served on 127.0.0.1:13000
    # workers: python -m vae_lab.sweep FILE --storage grpc://127.0.0.1:13000 ...
    python -m vae_lab.storage_proxy --storage postgresql://... --host 0.0.0.0 --port 13000

It listens on 127.0.0.1 unless --host says otherwise: the proxy has no authentication, and anyone
who reaches it can change the studies. It runs until Ctrl-C or SIGTERM. The storage itself is
`vae_lab.study.storage` (`serve_storage`); this module is the command.
"""

from __future__ import annotations

import argparse
import socket
import sys

import optuna

from vae_lab.cli import stop_on_signals
from vae_lab.config import ConfigError
from vae_lab.study import storage as store
from vae_lab.tracking.uris import redact

WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vae_lab.storage_proxy",
        description="Serve an Optuna database to sweep workers over gRPC: they pass --storage grpc://HOST:PORT "
                    "and only this process connects to the database.")
    parser.add_argument("--storage", required=True, help="the Optuna database, postgresql://... or mysql://...")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; 0.0.0.0 for workers on other machines)")
    parser.add_argument("--port", type=int, default=store.DEFAULT_PROXY_PORT,
                        help=f"port (default {store.DEFAULT_PROXY_PORT}; 0 picks a free one)")
    return parser


def workers_url(host: str, port: int) -> str:
    """The --storage a worker passes: this machine's name when listening on every address."""
    name = socket.getfqdn() if host in WILDCARD_HOSTS else host
    return f"{store.GRPC_PREFIX}[{name}]:{port}" if ":" in name else f"{store.GRPC_PREFIX}{name}:{port}"


def main(argv: list[str] | None = None) -> int:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        if not 0 <= args.port <= 65535:
            raise ConfigError(f"--port {args.port} is out of range; allowed 0..65535 (0 picks a free one)")
        store.check_proxied_storage(args.storage)
        server, port = store.serve_storage(args.storage, args.host, args.port)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    stop_on_signals()
    print(f"Optuna storage {redact(args.storage)} served on {args.host}:{port}; workers pass "
          f"--storage {workers_url(args.host, port)}   (Ctrl-C stops)", flush=True)
    try:
        server.wait_for_termination()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop(grace=5).wait()  # calls under way get 5 s to finish
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    from vae_lab.cli import exit_now

    exit_now(main())
