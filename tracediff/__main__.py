"""``python -m tracediff …``: the same commands as the ``tracediff`` script."""

from __future__ import annotations

import sys

from tracediff.cli import main

if __name__ == "__main__":
    sys.exit(main())
