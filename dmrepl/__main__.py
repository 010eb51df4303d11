"""`python -m dmrepl` runs the CLI."""

from dmrepl.cli import main

main()
