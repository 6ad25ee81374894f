"""Decoding at long context: resident memory and tokens/s after 4k..128k tokens of context, hybrid
beside the Transformer, fresh process per point (`make bench-decode`).

The logic lives in :mod:`sbtrain.bench.decode` (importable by the installed `sbtrain-bench`);
this script is `sbtrain-bench decode` for a checkout, e.g. `python benchmarks/decode.py lengths=[4k,32k]`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sbtrain.cli.bench import main

if __name__ == "__main__":
    main(["decode", *sys.argv[1:]])
