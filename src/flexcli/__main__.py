"""`python -m flexcli` runs the `flex` command line."""

from .cli import main

main()
