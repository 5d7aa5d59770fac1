"""What the `python -m vae_lab.*` commands share."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import sys


def exit_now(code: int) -> None:
    """End the process with `code` once its output and exit handlers are done, skipping the
    interpreter's teardown of every loaded module: with torch, MLflow and their dependencies
    loaded that teardown takes 1.5-2 s and does nothing a finished command needs (files,
    runs and stores are already flushed and closed by then)."""
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def shell_command(program: str) -> str:
    """How a person types `program` ("python", "mlflow") in a plain shell to run the copy
    installed beside this interpreter: the bare name where the shell's PATH finds that copy (an
    activated virtual environment, or none in use), else its path (.venv/bin/mlflow when run
    from the checkout, as `make sweep` runs it)."""
    folder = os.path.dirname(os.path.abspath(sys.executable))
    own = os.path.join(folder, program)
    if sys.prefix == sys.base_prefix or not os.path.exists(own):
        return program
    found = shutil.which(program)
    if found is not None and os.path.dirname(os.path.abspath(found)) == folder:
        return program
    relative = os.path.relpath(own)
    return own if relative.startswith("..") else relative


def stop_on_signals() -> None:
    """Ctrl-C and SIGTERM both raise KeyboardInterrupt in the main thread (a server's wait ends
    there). SIGINT is set explicitly: a process started in the background inherits it ignored."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, interrupt)
