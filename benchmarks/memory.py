"""Memory vs length: training peak memory (fwd+bwd, fresh process per point) and decode-cache bytes
for sb7b_tiny (4k..128k) and qwen2_tiny (4k..32k) (`make bench-memory`).

The logic lives in :mod:`sbtrain.bench.memory` (importable by the installed `sbtrain-bench`);
this script is `sbtrain-bench memory` for a checkout, e.g. `python benchmarks/memory.py lengths=[4k,16k]`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sbtrain.cli.bench import main

if __name__ == "__main__":
    main(["memory", *sys.argv[1:]])
