"""``python -m scripts.make_pairs`` from a clone; installed, the same command is
``textenv-make-pairs`` (textenv.agents.cli.make_pairs)."""

import sys

from textenv.agents.cli.launch import make_pairs as main

if __name__ == "__main__":
    sys.exit(main())
