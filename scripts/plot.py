"""``python -m scripts.plot`` from a clone; installed, the same command is ``textenv-plot``
(textenv.agents.cli.plot)."""

import sys

from textenv.agents.cli.launch import plot as main

if __name__ == "__main__":
    sys.exit(main())
