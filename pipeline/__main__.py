"""``python -m pipeline <command> ...``: the same front door as the ``pipeline`` console script."""
import sys

from pipeline.cli import main

sys.exit(main())
