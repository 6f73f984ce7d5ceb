"""`python -m kotune`: the same CLI as the `kotune` command."""

from .cli import main

main()
