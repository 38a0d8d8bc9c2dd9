"""``python -m scripts.train`` from a clone; installed, the same command is ``textenv-train`` (agents.cli.train)."""

import sys

from agents.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
