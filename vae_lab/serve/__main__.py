"""`python -m vae_lab.serve`: a local page to play with logged models (`vae_lab.serve.app`).

    python -m vae_lab.serve                       # the newest study's best run (else the newest run)
    python -m vae_lab.serve --run RUN_ID
    python -m vae_lab.serve --experiment NAME     # that experiment's run with the lowest val/loss
    # serving on http://127.0.0.1:20202           (--host, --port, --tracking-uri)

This module is the command: arguments, the run it opens on, the server's lifetime.
"""

from __future__ import annotations

import argparse
import sys

from vae_lab.cli import stop_on_signals
from vae_lab.serve.app import DEFAULT_PORT, create_app, make_json_server
from vae_lab.serve.catalog import RunCatalog, choose_run, describe_run
from vae_lab.serve.images import RequestError
from vae_lab.tracking.checks import missing_store
from vae_lab.tracking.uris import resolve_tracking_uri


def url_of(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vae_lab.serve",
        description="Serve a page to generate images from a logged model (default: the best run, on "
                    "validation, of the newest study; without studies the newest finished run with a model).",
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--run", metavar="RUN_ID", help="serve this run first")
    which.add_argument("--experiment", metavar="NAME",
                       help="serve that experiment's finished run with the lowest val/loss first "
                            "(its newest when no run logged val/loss)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"port (default {DEFAULT_PORT}; 0 picks a free one)")
    parser.add_argument("--tracking-uri", default="",
                        help="MLflow store (default $MLFLOW_TRACKING_URI, else mlruns/mlflow.db)")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        print(f"error: --port {args.port} is out of range; allowed 0..65535", file=sys.stderr)
        return 2

    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    problem = missing_store(tracking_uri)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    catalog = RunCatalog(tracking_uri)
    try:
        run = choose_run(catalog, args.run, args.experiment)
        app = create_app(tracking_uri, run.info.run_id, catalog)
        app.extensions["vae_lab.loaded_runs"].get(run.info.run_id)  # fail now, not on the first click
    except (LookupError, RequestError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        server = make_json_server(args.host, args.port, app)
    except OSError as error:
        print(f"error: cannot listen on {args.host}:{args.port} ({error.strerror or error}); "
              "choose another --port (0 picks a free one)", file=sys.stderr)
        return 2

    summary = describe_run(run, catalog.experiment_names())
    val_loss = f", val/loss {summary['val_loss']:.2f}" if summary["val_loss"] is not None else ""
    print(f"run {summary['run_id']} ({summary['model']}, latent {summary['latent_dim']}{val_loss}, "
          f"experiment {summary['experiment']!r})")
    print(f"serving on {url_of(args.host, server.server_port)}   (Ctrl-C stops)", flush=True)
    stop_on_signals()
    try:
        server.serve_forever()  # werkzeug's returns quietly on KeyboardInterrupt
    finally:
        server.server_close()
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())


if __name__ == "__main__":
    from vae_lab.cli import exit_now

    exit_now(main())
