"""`python -m cfgdiff` runs the command-line interface."""

from cfgdiff.cli import console_main

console_main()
