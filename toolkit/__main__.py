"""`python -m toolkit` runs the statskit command line."""

from .cli import main

main()
