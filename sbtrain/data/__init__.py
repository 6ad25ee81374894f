"""Data pipeline: raw text -> tokens -> megatron-core indexed files -> packed samples with a global loader state.

Heavy imports (megatron-core, datasets, transformers) happen inside the functions that need them,
so importing this package is cheap.
"""

from sbtrain.data.build import build_indexed_dataset, check_vocab, read_manifest
from sbtrain.data.loader import IGNORE_INDEX, PackedLoader, loader_from_config
from sbtrain.data.sources import DataError

__all__ = [
           "IGNORE_INDEX",
           "DataError",
           "PackedLoader",
           "build_indexed_dataset",
           "check_vocab",
           "loader_from_config",
           "read_manifest",
]
