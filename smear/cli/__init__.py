"""The `smear` command line (typer); the only package that imports typer or rich."""

from smear.cli.app import app, main

__all__ = ["app", "main"]
