"""Spiking utilities beyond the neuron op: spike codings of integer counts (:mod:`.codings`),
streaming spike statistics (:mod:`.stats`), the energy estimate (:mod:`.energy`) and the schema of
``sbtrain-spike stats|sweep`` (:mod:`.config`, CLI in ``sbtrain.cli.spike``).

The neuron itself is ``operators.spike`` (an op); applying it to a model is
``sbtrain.models.spiking``; ``model.spike`` in the model config switches it on. W8ASpike (int8
weights + spikes, fake-quant path and loss change) is :mod:`sbtrain.spike.w8a`, not imported here
because it imports the model package.
"""

from sbtrain.spike.codings import CODINGS, SIGNED_CODINGS, CodingError, decode, encode, num_spikes, time_steps
from sbtrain.spike.stats import SpikeStats

__all__ = ["CODINGS", "SIGNED_CODINGS", "CodingError", "SpikeStats", "decode", "encode", "num_spikes", "time_steps"]
