"""A private single-node Slurm for the launch tests: munged, slurmctld and slurmd on localhost.

Everything lives in one temporary directory (config, state, spool, logs, the munge key and
socket, PID files), the daemons listen on free ports, and :meth:`SlurmCluster.stop` ends them by
their own PIDs, so nothing outside the test is touched. Needs root (slurmd runs jobs as any user)
and Debian's ``slurm-wlm`` + ``munge``; :func:`slurm_missing` says what is absent.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo")


def slurm_missing() -> str | None:
    """Why a real Slurm cannot be started here, or None."""
    missing = [name for name in (*DAEMONS, *CLIENTS) if shutil.which(name) is None
               and not Path("/usr/sbin", name).exists()]
    if missing:
        return f"not installed: {', '.join(missing)} (apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "slurmd must run as root"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


CONF = """\
ClusterName=sbtraintest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
SlurmdTimeout=60
InactiveLimit=0
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    def __init__(self, root: Path, cpus: int = 2):
        self.root, self.cpus = Path(root), cpus
        self.host = socket.gethostname().split(".")[0]  # slurmctld only runs on the host it names
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> SlurmCluster:
        """Start the three daemons and wait for the node to be idle; on failure, stop what started."""
        try:
            return self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> SlurmCluster:
        for sub in ("state", "spool", "munge"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o755)  # clients need to reach the socket
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        self.conf.write_text(CONF.format(host=self.host, root=self.root, cpus=self.cpus, ctld_port=_free_port(),
                                         slurmd_port=_free_port(), munge_socket=self.munge_socket))
        m = self.root / "munge"
        self._run([_binary("munged"), "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
                   f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log", f"--seed-file={m}/munged.seed"])
        self._run([_binary("slurmctld"), "-c", "-f", str(self.conf)])  # -c: a clean state, no old jobs
        self._run([_binary("slurmd"), "-N", self.host, "-f", str(self.conf)])
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], check=False, env=self.env, capture_output=True, text=True)
            if out.returncode == 0 and out.stdout.strip() in ("idle", "mixed", "allocated"):
                return self
            time.sleep(0.5)
        raise RuntimeError(f"slurm did not come up in {timeout} s: sinfo says {out.stdout!r} {out.stderr!r}\n"
                           + self.logs())

    def stop(self) -> None:
        """End the daemons by the PIDs they wrote (slurmd, slurmctld, then munged)."""
        for pid_file in ("slurmd.pid", "slurmctld.pid", "munge/munged.pid"):
            path = self.root / pid_file
            try:
                pid = int(path.read_text().strip())
            except (OSError, ValueError):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)

    # -- commands -------------------------------------------------------------------------------
    def _run(self, cmd: list[str], **kw) -> subprocess.CompletedProcess:
        out = subprocess.run(cmd, check=False, env=self.env, capture_output=True, text=True, **kw)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stdout}{out.stderr}\n{self.logs()}")
        return out

    def sbatch(self, *args: str, env: dict | None = None, cwd: Path | None = None) -> int:
        out = subprocess.run(["sbatch", "--parsable", *args], check=False, env={**self.env, **(env or {})}, cwd=cwd,
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"sbatch failed: {out.stderr}\n{self.logs()}")
        return int(out.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict:
        """``scontrol show job`` as a dict (JobState, RestartCnt, ExitCode, ...)."""
        out = self._run(["scontrol", "-o", "show", "job", str(job_id)]).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def scontrol(self, *args: str) -> str:
        return self._run(["scontrol", *args]).stdout

    def signal_batch(self, job_id: int, sig: str = "USR1") -> None:
        """What ``--signal=B:USR1@120`` does at the time limit: signal the batch script only."""
        self._run(["scancel", "--batch", f"--signal={sig}", str(job_id)])

    def wait(self, job_id: int, states: tuple[str, ...], timeout: float, poll: float = 0.5) -> dict:
        deadline = time.time() + timeout
        info = {}
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime" and info.get("Restarts") != "0":
                # Slurm holds a requeued job for 2 minutes before it may start again; a test need not.
                self.scontrol("update", f"JobId={job_id}", "StartTime=now")
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout} s: {info}\n{self.logs()}")

    def logs(self, tail: int = 30) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "munge/munged.log"):
            path = self.root / name
            if path.exists():
                lines = path.read_text(errors="replace").splitlines()[-tail:]
                parts.append(f"--- {name}\n" + "\n".join(lines))
        return "\n".join(parts)
