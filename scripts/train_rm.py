"""``python -m scripts.train_rm`` from a clone; installed, the same command is
``textenv-train-rm`` (textenv.agents.cli.train_rm)."""

import sys

from textenv.agents.cli.launch import train_rm as main

if __name__ == "__main__":
    sys.exit(main())
