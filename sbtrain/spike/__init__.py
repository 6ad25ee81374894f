"""Spiking utilities beyond the neuron op: spike codings of integer counts (:mod:`.codings`).

The neuron itself is ``operators.spike`` (an op); applying it to a model is
``sbtrain.models.spiking``; ``model.spike`` in the model config switches it on.
"""

from sbtrain.spike.codings import CODINGS, SIGNED_CODINGS, CodingError, decode, encode, num_spikes, time_steps

__all__ = ["CODINGS", "SIGNED_CODINGS", "CodingError", "decode", "encode", "num_spikes", "time_steps"]
