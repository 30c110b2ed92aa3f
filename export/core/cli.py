"""What every command line shares: one vocabulary of flags, one error path, named exit codes.

Vocabulary (docs/development.md#command-lines):

    --artifacts DIR       an export folder (python -m export.build_engine's --out)
    --runner KIND         what runs an export offline: onnxruntime, tensorrt, auto, triton (old: --runtime,
                          --backend; export.build_engine's --runtime is the TensorRT flavour it builds with)
    --served-model NAME   the model clients call on a Triton server, the repository's ensemble (old: --name,
                          --model, --triton-model)
    --url HOST:PORT       a running Triton server
    --force               replace an existing output

Old spellings parse to the same destination and are hidden from -h (`add_option(..., aliases=...)`).

Every CLI's `main(argv) -> int` is wrapped by `command()`: an MvtError it raises (or one of the types
given) is printed as one `error: ...` message on stderr and returns EXIT_BAD_INPUT, with no traceback;
console scripts (`[project.scripts]`) call that `main`. `python -m` and `python scripts/x.py` end with
`run_cli(main)`. Standard library and export.core only.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from export.core.errors import MvtError

# Exit status of every CLI.
EXIT_OK = 0
EXIT_FAILED = 1  # the run finished and a check failed (parity thresholds, a request, a fault check)
EXIT_BAD_INPUT = 2  # bad input or a refused output (nothing written); argparse's usage errors too
EXIT_ENGINE_FAILED = 3  # export.build_engine: the engine build failed; the ONNX artifacts are complete

DEFAULT_SERVED_MODEL = "embed"

Main = Callable[..., int]

# --runner's choices, one description each (a CLI offers those it can run)
RUNNER_KINDS_HELP = {
    "auto": "the folder's TensorRT plan where it can run here, else onnxruntime",
    "onnxruntime": "model.onnx in onnxruntime",
    "tensorrt": "model.plan in the TensorRT runtime that built it (a GPU)",
    "triton": "the served ensemble at --url (--served-model)",
}

# the keyword arguments of add_argument that a hidden alias copies (how its value parses)
_PARSING = ("action", "nargs", "const", "type", "choices", "metavar")


def add_option(container, flag: str, *, aliases: Sequence[str] = (), **kwargs) -> argparse.Action:
    """container.add_argument(flag, **kwargs), plus each old spelling in `aliases` as a hidden alias: it parses
    the same way into the same dest and -h does not list it. The flag's default stays the only default."""
    action = container.add_argument(flag, **kwargs)
    parsing = {k: v for k, v in kwargs.items() if k in _PARSING}
    for old in aliases:
        container.add_argument(old, dest=action.dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **parsing)
    return action


def add_artifacts(container, *, required: bool = False, default: str | None = None) -> argparse.Action:
    """--artifacts DIR: an export folder to read. `default`: what happens without it (optional flags)."""
    note = f" (default: {default})" if default else ""
    return container.add_argument(
        "--artifacts", type=Path, required=required, metavar="DIR",
        help=f"an export folder: python -m export.build_engine's --out (manifest.json, model.onnx){note}")


def add_runner(container, *, choices: Sequence[str], default: str, aliases: Sequence[str] = ()) -> argparse.Action:
    """--runner KIND: what runs the export in this process (or the served ensemble, for triton)."""
    kinds = "; ".join(f"{kind}: {RUNNER_KINDS_HELP[kind]}" for kind in choices)
    return add_option(container, "--runner", aliases=aliases, choices=tuple(choices), default=default,
                      help=f"what runs the export: {kinds} (default: {default})")


def add_served_model(container, *, aliases: Sequence[str] = ()) -> argparse.Action:
    """--served-model NAME: the model clients call on the server (the repository's ensemble)."""
    return add_option(container, "--served-model", aliases=aliases, default=DEFAULT_SERVED_MODEL, metavar="NAME",
                      help="the model clients call on the Triton server: the repository's ensemble "
                           f"(default: {DEFAULT_SERVED_MODEL})")


def add_url(container, *, note: str = "") -> argparse.Action:
    """--url HOST:PORT: a running Triton server. `note`: what this command does with it."""
    return container.add_argument("--url", metavar="HOST:PORT",
                                  help="address of a running Triton server" + (f" ({note})" if note else ""))


def add_force(container, *, what: str) -> argparse.Action:
    """--force: replace an existing output; `what` says which."""
    return container.add_argument("--force", action="store_true", help=f"replace an existing output: {what}")


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first non-empty line of an exception's text (at most `limit` characters), for a one-line report of an
    error that is not ours (TensorRT's, a library's); our own messages are printed whole."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0][:limit] if lines else ""


def fail(message: str, code: int = EXIT_BAD_INPUT) -> int:
    """Print `error: message` on stderr; return `code` (a CLI's main returns it)."""
    print(f"error: {message}", file=sys.stderr)
    return code


def command(*bad_input: type[BaseException]) -> Callable[[Main], Main]:
    """Decorate a CLI's `main(argv=None) -> int`: an MvtError (or one of `bad_input`) it raises is printed as
    `error: <message>` on stderr (the message as written: each says what to do) and main returns
    EXIT_BAD_INPUT. Anything else propagates with its traceback: a bug, not an input."""
    caught: tuple[type[BaseException], ...] = (MvtError, *bad_input)

    def decorate(main: Main) -> Main:
        if hasattr(main, "_cli_caught"):  # decorated already: its own types stand
            return main

        @functools.wraps(main)
        def wrapper(argv: list[str] | None = None) -> int:
            try:
                return main(argv)
            except caught as exc:
                return fail(str(exc))

        wrapper._cli_caught = caught  # type: ignore[attr-defined]
        return wrapper

    return decorate


def run_cli(main: Main, argv: list[str] | None = None) -> NoReturn:
    """The tail of every CLI (`if __name__ == "__main__": run_cli(main)`): run main, exit with its status; an
    MvtError it lets through exits EXIT_BAD_INPUT with one `error:` message, as command() does."""
    sys.exit(command()(main)(argv))
