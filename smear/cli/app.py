"""The `smear` typer app: the sub-apps, the consoles, the shared options and the one error boundary.

The commands live in run.py, train.py, eval.py and tools.py; each validates, calls one library
function and renders (render.py: rich tables and progress bars, used by the CLI only).
"""

from __future__ import annotations

import contextlib
import logging
import signal
from pathlib import Path
from typing import Annotated, Optional

import click
import typer
from rich.console import Console
from rich.highlighter import NullHighlighter
from rich.logging import RichHandler
from rich.text import Text
from typer.core import TyperGroup

from smear.errors import SmearError

_state = {"verbose": False}


class _ErrorBoundary(TyperGroup):
    """The one error boundary of every command: a SmearError is one red line, a hint, exit 1;
    tracebacks only with --verbose. ``-v``/``--verbose`` may also follow the subcommand."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if "--" in args:
            head, tail = args[:args.index("--")], args[args.index("--"):]
        else:
            head, tail = args, []
        flags = [a for a in head if a in ("-v", "--verbose")]
        rest = [a for a in head if a not in ("-v", "--verbose")]
        return super().parse_args(ctx, flags + rest + tail)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except SmearError as exc:
            if _state["verbose"]:
                raise
            fail(str(exc), exc.hint)


app = typer.Typer(cls=_ErrorBoundary, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="smear: blood-smear fields to a leukocyte differential.")
config_app = typer.Typer(no_args_is_help=True, help="Show configuration.")
train_app = typer.Typer(no_args_is_help=True, help="Train a stage.")
eval_app = typer.Typer(no_args_is_help=True, help="Evaluate a stage on labelled data.")
data_app = typer.Typer(no_args_is_help=True, help="Prepare datasets.")

# markup off: file and slide names are printed as they are ("q[/]x.jpg" is a name, not a tag);
# the few styled lines pass markup=True with the user strings escaped
out_console = Console(highlight=False, soft_wrap=True, markup=False)
if not out_console.is_terminal:  # pipes and files get whole tables, not 80-column ellipses
    out_console = Console(highlight=False, soft_wrap=True, width=160, markup=False)
err_console = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML file overriding defaults.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a key: a.b=value (repeatable).")]


def verbose() -> bool:
    """Whether --verbose was given."""
    return _state["verbose"]


def fail(message: str, hint: str = "", code: int = 1) -> None:
    """Print one red error line (and a dim hint) and exit non-zero; the text is never read as markup."""
    err_console.print(Text.assemble(("error:", "bold red"), " ", message), highlight=False)
    if hint:
        err_console.print(Text(f"hint: {hint}", style="dim"))
    raise typer.Exit(code)


def warn(message: str) -> None:
    """One yellow warning line on stderr; file names in it are printed as they are, not as markup."""
    err_console.print(Text.assemble(("warning:", "yellow"), " ", message), highlight=False)


def show(message: str) -> None:
    """A result line, on stdout."""
    out_console.print(message, markup=False)


@contextlib.contextmanager
def terminate_cleanly():
    """SIGTERM unwinds like Ctrl-C, so temporary files are removed by the code that made them."""
    def on_term(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread (e.g. inside a test runner's thread)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _LogHandler(RichHandler):
    """The library's log records as plain lines on stderr: progress as it is, warnings as `warning:`."""

    def render(self, *, record: logging.LogRecord, traceback, message_renderable):
        if record.levelno >= logging.WARNING:
            return Text.assemble(("warning:", "yellow"), " ", message_renderable)
        return message_renderable


def setup_logging(verbose: bool) -> None:
    """smear's loggers (and Python warnings) to stderr through rich; debug lines with --verbose."""
    logger = logging.getLogger("smear")
    for handler in [h for h in logger.handlers if isinstance(h, _LogHandler)]:
        logger.removeHandler(handler)
    handler = _LogHandler(console=err_console, show_time=False, show_level=False, show_path=False,
                          markup=False, highlighter=NullHighlighter(), rich_tracebacks=False)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    warnings_logger = logging.getLogger("py.warnings")
    if not any(isinstance(h, _LogHandler) for h in warnings_logger.handlers):
        warnings_logger.addHandler(handler)
    warnings_logger.propagate = False


def _show_version(value: bool) -> None:
    if value:
        from smear import __version__

        show(f"smear {__version__}")
        raise typer.Exit()


@app.callback()
def _root(ctx: typer.Context,
          verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Tracebacks on errors, debug lines; "
                                                "also accepted after the subcommand.")] = False,
          version: Annotated[bool, typer.Option("--version", callback=_show_version, is_eager=True,
                                                help="Print the version and exit.")] = False,
          ) -> None:
    _state["verbose"] = verbose
    setup_logging(verbose)
    logging.captureWarnings(True)  # warnings.warn of the library: one yellow line, not a source dump
    ctx.call_on_close(lambda: logging.captureWarnings(False))


def main() -> None:
    """Console-script entry point."""
    app()

