"""Conversion of HF Transformers into sbtrain hybrids (``sbtrain-convert``) and MoE upcycling.

- :mod:`sbtrain.convert.config`     the command's typed schema (``recipes/convert.yaml``)
- :mod:`sbtrain.convert.hf_source`  reading and checking an HF folder without loading it
- :mod:`sbtrain.convert.hf_import`  the mapping and the streamed write (``convert_hf``)
- :mod:`sbtrain.convert.upcycle`    dense FFN -> experts, with the report's or the exact scale
"""

from sbtrain.convert.config import ConvertConfig, UpcycleConfig
from sbtrain.convert.hf_import import convert_hf
from sbtrain.convert.hf_source import ConversionError
from sbtrain.convert.upcycle import upcycle_factors, upcycle_moe_state

__all__ = ["ConversionError", "ConvertConfig", "UpcycleConfig", "convert_hf", "upcycle_factors", "upcycle_moe_state"]
