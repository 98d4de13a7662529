"""`python -m smear.cli`: the same as the `smear` command."""

from smear.cli.app import main

main()
