"""sbtrain: continual pretraining of SpikingBrain-style hybrid linear-attention LLMs."""

__version__ = "0.1.0"
