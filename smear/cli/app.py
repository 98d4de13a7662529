"""The `smear` typer app: the sub-apps, the consoles, the shared options and the one error boundary.

The commands live in run.py, train.py, eval.py and tools.py; each validates, calls one library
function and renders (render.py: rich tables and progress bars, used by the CLI only).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import warnings
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
_log = logging.getLogger(__name__)
try:  # typer >= 0.29 carries its own click inside it
    from typer._click.exceptions import UsageError as _TyperUsageError
except ImportError:
    _TyperUsageError = click.UsageError
_USAGE_ERRORS = tuple({click.UsageError, _TyperUsageError})


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
        except _USAGE_ERRORS as exc:  # a wrong option or value: the same one line, not click's box
            if _state["verbose"]:
                raise
            message = " ".join(exc.format_message().replace("Value error, ", "").split())
            where = exc.ctx.command_path if exc.ctx is not None else "smear"
            fail(message, f"{where} --help", code=exc.exit_code)


def _tidy_help() -> None:
    """Help in the usual style whatever typer's version: a flag shows no value placeholder
    (typer 0.29 prints ``<bool>``), a repeatable option its element (``<path>``, not
    ``<list[Path]>``), and the usage line ``PATHS...`` (not ``{paths}...``)."""
    import typing

    core = typer.core
    option, argument = getattr(core, "TyperOption", None), getattr(core, "TyperArgument", None)
    if option is None or argument is None or not hasattr(option, "display_type_rich"):
        return  # an older typer: click's own metavars

    def element(param) -> str | None:
        desc = getattr(param, "type_descriptor", None)
        if desc is None or not desc.is_list or desc.is_choice:
            return None
        inner = (typing.get_args(desc.annotation) or (str,))[0]
        return "<path>" if inner is Path else f"<{getattr(inner, '__name__', 'value').lower()}>"

    plain_option = option.display_type_rich

    def option_type(self, ctx):
        if self.metavar is None and self.is_flag:
            return None
        if self.metavar is None and element(self):
            return element(self)
        return plain_option(self, ctx)

    plain_argument = argument.display_type_rich

    def argument_type(self, ctx):
        return element(self) if self.metavar is None and element(self) else plain_argument(self, ctx)

    def usage_name(self) -> str:
        name = self.display_name_raw.upper() if self.metavar is None else self.display_name_raw
        name = name if self.required else f"[{name}]"
        return name + ("..." if self.nargs != 1 else "")

    option.display_type_rich = option_type
    argument.display_type_rich = argument_type
    if hasattr(argument, "_usage_display_name"):
        argument._usage_display_name = usage_name


_tidy_help()

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
    """One yellow warning line on stderr, through smear's logger and the one handler ``setup_logging``
    gives it (as the library's warnings); file names in it are printed as they are, not as markup."""
    _log.warning(message)


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
    """The one handler of smear's loggers (the library's and the CLI's): its records as plain lines on
    stderr, progress as it is, warnings as `warning:`."""

    def render(self, *, record: logging.LogRecord, traceback, message_renderable):
        if record.levelno >= logging.WARNING:
            return Text.assemble(("warning:", "yellow"), " ", message_renderable)
        return message_renderable


_LOGGERS = ("smear", "py.warnings")  # smear's own, and Python warnings (logging.captureWarnings)


def setup_logging(verbose: bool) -> None:
    """smear's loggers (and Python warnings) to stderr through rich; debug lines with --verbose."""
    reset_logging()
    handler = _LogHandler(console=err_console, show_time=False, show_level=False, show_path=False,
                          markup=False, highlighter=NullHighlighter(), rich_tracebacks=False, keywords=[])
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.propagate = False
    logging.getLogger("smear").setLevel(logging.DEBUG if verbose else logging.INFO)


def reset_logging() -> None:
    """The loggers as they were before ``setup_logging`` (a library in another program, or a test,
    then handles smear's records itself)."""
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if isinstance(h, _LogHandler)]:
            logger.removeHandler(handler)
        logger.propagate = True
    logging.getLogger("smear").setLevel(logging.NOTSET)


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
    plain = warnings.formatwarning
    if not verbose:  # the message alone; its file, line and category with --verbose
        warnings.formatwarning = lambda message, category, filename, lineno, line=None: str(message)

    def restore() -> None:
        logging.captureWarnings(False)
        warnings.formatwarning = plain
        reset_logging()

    ctx.call_on_close(restore)


def main() -> None:
    """Console-script entry point."""
    app()

