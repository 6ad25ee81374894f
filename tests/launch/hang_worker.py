"""One rank of the hung-collective test: ``python -m tests.launch.hang_worker TIMEOUT_S SKIP_RANK``.

Started twice by the test with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set. Every rank
joins the job's group through ``sbtrain.trainer.distributed.init_process_group`` with the
timeout knob, then all-reduces over a *sub-group* (as the device mesh's groups are, so the knob
must reach those too), except ``SKIP_RANK``, which skips the collective and idles. The waiting
rank must fail with ``CollectiveTimeoutError`` naming itself and the op; it prints the message
and exits 3.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.distributed as dist

from sbtrain.trainer.distributed import CollectiveTimeoutError, init_process_group, report_collective_timeouts


def main() -> int:
    timeout_s, skip_rank = float(sys.argv[1]), int(sys.argv[2])
    init_process_group(torch.device("cpu"), timeout_s)
    group = dist.new_group(list(range(dist.get_world_size())))
    rank = dist.get_rank()
    try:
        with report_collective_timeouts(timeout_s, lambda: "step 3"):
            if rank == skip_rank:
                time.sleep(timeout_s * 4)  # "hung": never joins the all-reduce
            else:
                dist.all_reduce(torch.ones(4), group=group)
    except CollectiveTimeoutError as exc:
        print(f"CollectiveTimeoutError: {exc}", file=sys.stderr, flush=True)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
