"""Inference and memory benchmarks behind ``sbtrain-bench`` (ttft, memory, decode).

The logic lives in the package (not in the top-level ``benchmarks/`` folder) so that the
installed console script can import it; ``benchmarks/ttft.py``, ``memory.py`` and ``decode.py``
are thin scripts over :func:`sbtrain.cli.bench.main` for a checkout.
"""
