"""``python -m tests.launch.fault_worker <overrides>``: sbtrain.train with one injected hard fault.

Launched by ``launch/torchrun.sh`` (``SBTRAIN_MODULE=tests.launch.fault_worker``) in the fault
tests. Rank ``SBTRAIN_FAULT_RANK`` (default 1) sends itself SIGKILL as it enters step
``SBTRAIN_FAULT_STEP`` (1-based), while its peers already wait in that step's first collective:
a rank dying mid-step, with no chance to clean up. It happens once per marker file
``SBTRAIN_FAULT_ONCE`` (created just before the kill), so the restarted run trains through.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch.distributed as dist

from sbtrain.trainer.trainer import Trainer


def _install_fault() -> None:
    step = int(os.environ["SBTRAIN_FAULT_STEP"])
    rank = int(os.environ.get("SBTRAIN_FAULT_RANK", "1"))
    marker = Path(os.environ["SBTRAIN_FAULT_ONCE"])
    real_train_step = Trainer.train_step

    def train_step(self, micro_batches):
        if self.step + 1 == step and dist.get_rank() == rank and not marker.exists():
            marker.write_text(f"rank {rank} killed at step {step}, pid {os.getpid()}\n")
            os.kill(os.getpid(), signal.SIGKILL)
        return real_train_step(self, micro_batches)

    Trainer.train_step = train_step


if __name__ == "__main__":
    _install_fault()
    from sbtrain.train import main

    main()
