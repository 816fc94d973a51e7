"""``python -m fastflow``: the command line (:mod:`fastflow.cli`)."""

import sys

from fastflow.cli import main

if __name__ == "__main__":
    sys.exit(main())
