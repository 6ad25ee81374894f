"""sbtrain: continual pretraining of SpikingBrain-style hybrid linear-attention LLMs.

This root ``__init__`` runs before every ``sbtrain.*`` module, so it imports nothing from the
project (tests/test_architecture.py checks it): any layer may use what it defines.
"""

from pathlib import Path

__version__ = "0.1.0"

# The Hydra recipes (``recipes/`` at the top of the checkout) ship inside the package as
# ``sbtrain/recipes`` (a link to ``../recipes`` in the checkout, copied into wheels as package data),
# so every command finds them the same way from a checkout, an editable or a regular install.
RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
