"""`python -m launcher`: the same as the `pulse` command."""

from launcher.cli import main

main()
