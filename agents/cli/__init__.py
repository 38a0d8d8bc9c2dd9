"""The command-line programs (``textenv-train``, ``textenv-train-text``, ``textenv-evaluate``,
``textenv-plot``; ``python -m scripts.<name>`` from a clone)."""
