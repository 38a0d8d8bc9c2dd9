"""PPO with GAE: one core for classic-control, MuJoCo and language-model policies.

This directory is the package ``textenv.agents`` (pyproject.toml's ``package-dir``); imported as
a top-level ``agents`` from the repository root, its modules would be second copies of the same
files, with classes that are not ``textenv.agents``' own.
"""

if __name__ == "agents":
    raise ImportError(
        "import textenv.agents, not agents: the repository's agents/ is the package textenv.agents "
        '(install the project first: pip install -e ".[dev]", or make)'
    )
