"""The command-line programs (``textenv-train``, ``textenv-train-text``, ``textenv-evaluate``,
``textenv-plot``; ``python -m scripts.<name>`` from a clone). Their entry points are in
:mod:`textenv.agents.cli.launch`; importing this package changes nothing."""
