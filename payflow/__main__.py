"""python -m payflow: the payflow command."""

from payflow.cli import main

main()
