"""Time to first token: prefill time of sb7b_tiny vs qwen2_tiny, 4k..128k, one run (`make bench-ttft`).

The logic lives in :mod:`sbtrain.bench.ttft` so that the installed `sbtrain-bench` console
script can import it; this script is `sbtrain-bench ttft` for a checkout, taking the same
key=value overrides, e.g. `python benchmarks/ttft.py lengths=[4k,16k] repeats=1`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sbtrain.cli.bench import main

if __name__ == "__main__":
    main(["ttft", *sys.argv[1:]])
