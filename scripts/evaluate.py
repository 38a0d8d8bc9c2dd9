"""``python -m scripts.evaluate`` from a clone; installed, the same command is ``textenv-evaluate`` (agents.cli.evaluate)."""

import sys

from agents.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
