"""`python -m stagediff`: the `stagediff` command, for environments whose scripts folder is not on PATH."""

from stagediff.cli import run

run()
