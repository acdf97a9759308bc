"""python -m sgattn: the sgattn command."""
import sys

from .cli import main

sys.exit(main())
