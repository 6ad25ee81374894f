"""Command-line entry points (each a Hydra app over ``recipes/``; see :mod:`sbtrain.cli.app`)."""
