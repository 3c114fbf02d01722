"""`python -m optimizer.cli CMD`: every command is registered by the package before this runs."""

from optimizer.cli import main

main()
