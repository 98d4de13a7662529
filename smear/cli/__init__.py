"""The `smear` command line (typer); the only package that imports typer or rich."""

from smear.cli import run, tools, train, eval  # noqa: F401 - each registers its commands, in the order of --help
from smear.cli.app import app, config_app, data_app, eval_app, main, train_app

app.add_typer(config_app, name="config")
app.add_typer(train_app, name="train")
app.add_typer(eval_app, name="eval")
app.add_typer(data_app, name="data")

__all__ = ["app", "main"]
