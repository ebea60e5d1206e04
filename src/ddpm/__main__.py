"""``python -m ddpm``: the ``ddpm`` command."""
import sys

from .cli import main

sys.exit(main())
