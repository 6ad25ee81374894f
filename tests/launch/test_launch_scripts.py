"""The launchers' own logic, without a cluster: what ``launch/torchrun.sh`` hands torchrun (single
node vs c10d multi-node, USR1 forwarding, overrides passed through), the rank layout taken from
Slurm's variables, and the submitit launcher config composing with the train schema."""

from __future__ import annotations

import os
import subprocess

import pytest

from sbtrain.trainer.distributed import rank_layout_from_slurm
from tests.trainer.e2e import ROOT


def torchrun_command(tmp_path, **env: str) -> list[str]:
    """The argv torchrun.sh would exec, captured by a stand-in interpreter that prints it."""
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    fake.chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if k not in ("NNODES", "MASTER_ADDR", "MASTER_PORT", "NPROC")}
    out = subprocess.run([str(ROOT / "launch" / "torchrun.sh"), "trainer.max_steps=3", "parallel.cp=2"],
                         env={**clean, "PYTHON": str(fake), **env}, capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def test_single_node_is_standalone_and_forwards_usr1_and_overrides(tmp_path):
    argv = torchrun_command(tmp_path, NPROC="4")
    assert argv[:2] == ["-m", "torch.distributed.run"] and "--standalone" in argv
    assert argv[argv.index("--nproc-per-node") + 1] == "4"
    assert "SIGUSR1" in argv[argv.index("--signals-to-handle") + 1].split(",")
    assert argv[argv.index("--max-restarts") + 1] == "0"
    assert argv[-4:] == ["-m", "sbtrain.train", "trainer.max_steps=3", "parallel.cp=2"]


def test_multi_node_uses_a_c10d_rendezvous_from_the_environment(tmp_path):
    argv = torchrun_command(tmp_path, NPROC="8", NNODES="4", MASTER_ADDR="node17", MASTER_PORT="29123",
                            RDZV_ID="job42", MAX_RESTARTS="2")
    assert "--standalone" not in argv
    pairs = {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--")}
    assert pairs["--nnodes"] == "4" and pairs["--rdzv-backend"] == "c10d"
    assert pairs["--rdzv-endpoint"] == "node17:29123" and pairs["--rdzv-id"] == "job42"
    assert pairs["--max-restarts"] == "2" and pairs["--nproc-per-node"] == "8"


def test_rank_layout_from_slurm_tasks():
    env = {"SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "20007",
           "SLURM_LAUNCH_NODE_IPADDR": "10.0.0.5"}
    rank_layout_from_slurm(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("3", "4", "1")
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("10.0.0.5", "20007")
    under_torchrun = {"SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1", "WORLD_SIZE": "16", "RANK": "9"}
    rank_layout_from_slurm(under_torchrun)
    assert under_torchrun["RANK"] == "9" and under_torchrun["WORLD_SIZE"] == "16"  # torchrun's layout wins
    one_task = {"SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"}
    rank_layout_from_slurm(one_task)
    assert "WORLD_SIZE" not in one_task


def test_submitit_launcher_config_composes_with_the_train_schema():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install hydra-submitit-launcher==1.2.0")
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from sbtrain.cli.app import RECIPES_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(RECIPES_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"hydra.searchpath=[file://{ROOT / 'launch'}]",
                                          "hydra/launcher=sbtrain_slurm", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.signal_delay_s == 120 and launcher.max_num_timeout == 3 and launcher.partition == "gpu"
    assert cfg.trainer.resume == "auto"  # a requeued sweep point resumes from its checkpoint
