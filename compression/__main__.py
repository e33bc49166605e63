"""`python -m compression MODEL ...`: the compress command without the coordinator's CLI."""

from compression.cli import app

app(prog_name="python -m compression")
