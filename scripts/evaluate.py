"""``python -m scripts.evaluate`` from a clone; installed, the same command is ``textenv-evaluate``
(textenv.agents.cli.evaluate)."""

import sys

from textenv.agents.cli.launch import evaluate as main

if __name__ == "__main__":
    sys.exit(main())
