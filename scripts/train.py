"""``python -m scripts.train`` from a clone; installed, the same command is ``textenv-train``
(textenv.agents.cli.train)."""

import sys

from textenv.agents.cli.launch import train as main

if __name__ == "__main__":
    sys.exit(main())
