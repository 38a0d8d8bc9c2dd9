"""``python -m scripts.train_text`` from a clone; installed, the same command is
``textenv-train-text`` (textenv.agents.cli.train_text)."""

import sys

from textenv.agents.cli.launch import train_text as main

if __name__ == "__main__":
    sys.exit(main())
