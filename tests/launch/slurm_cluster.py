"""A real single-machine SLURM cluster for tests: munged + slurmctld + two slurmd on 127.0.0.1.

Everything lives under one temporary directory (config, munge key and socket, state, spool, logs)
with its own ports, so it neither needs nor touches a system SLURM. Both nodes are slurmd
processes on this machine (``localhost`` and ``n2``, NodeAddr 127.0.0.1), which is enough to
exercise multi-node rendezvous, node ranks and per-node logs. Nothing is installed here: when
the binaries are missing or a daemon does not come up, :class:`ClusterUnavailable` says exactly
why and the tests skip with that reason.

Configuration lines that matter (measured, see /work/shared/platform-notes.md): proctrack/linuxproc
and task/none (no cgroups, no systemd), accounting off (use ``scontrol show job``), short
scheduler intervals so a requeued job starts again within seconds, MinJobAge so finished jobs stay
visible.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo")
HOST = socket.gethostname()
# Node 0 carries this machine's name so that the launcher's default rendezvous host (the first
# name in the allocation) resolves; node 1's name sorts after it. SLURM refuses "localhost".
NODES = (HOST, HOST + "x")


class ClusterUnavailable(RuntimeError):
    """The cluster cannot run here; the message is the skip reason."""


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(int(s.getsockname()[1]))
    for s in socks:
        s.close()
    return ports


def _tail(path: Path, n: int = 8) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def host_is_loopback() -> bool:
    """Whether this machine's name resolves to 127.0.0.1 only (then the default MASTER_ADDR,
    the first node's name, stays on 127.0.0.1)."""
    try:
        return set(socket.gethostbyname_ex(HOST)[2]) == {"127.0.0.1"}
    except OSError:
        return False


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None]


@dataclass
class SlurmCluster:
    root: Path
    cpus_per_node: int = 2
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """Environment for clients (sbatch, scontrol, ...): only SLURM_CONF is needed."""
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        return env

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> SlurmCluster:
        missing = missing_binaries()
        if missing:
            raise ClusterUnavailable(
                f"SLURM/munge binaries not on PATH: {', '.join(missing)} "
                "(install with: bash tools/install_ci_extras.sh)"
            )
        try:
            self._write_config()
            self._start_munge()
            self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
            for node in NODES:
                self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", str(self.conf)])
            self._wait_idle(timeout)
            self._smoke_job()
        except ClusterUnavailable:
            self.stop()
            raise
        return self

    def _write_config(self) -> None:
        r = self.root
        for d in ("etc", "munge/run", "state", "log", *(f"spool/{n}" for n in NODES)):
            (r / d).mkdir(parents=True, exist_ok=True)
        (r / "munge" / "run").chmod(0o755)
        ctld_port, d_port, *node_ports = _free_ports(2 + len(NODES))
        user = getpass.getuser()
        mem = max(1000, int(_mem_mb() * 0.8) // len(NODES))
        nodes = "\n".join(
            f"NodeName={n} NodeHostname={HOST} NodeAddr=127.0.0.1 Port={p} "
            f"CPUs={self.cpus_per_node} RealMemory={mem} State=UNKNOWN"
            for n, p in zip(NODES, node_ports, strict=True)
        )
        self.conf.write_text(
            f"""\
ClusterName=autothinktest
SlurmctldHost={HOST}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r}/munge/run/munge.sock,cred_expire=5
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MailProg=/bin/true
MinJobAge=600
KillWait=10
SchedulerParameters=sched_interval=2,bf_interval=1
ReturnToService=2
{nodes}
PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
"""
        )

    def _start_munge(self) -> None:
        m = self.root / "munge"
        key = m / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        proc = subprocess.run(
            [
                "munged",
                f"--key-file={key}",
                f"--socket={m}/run/munge.sock",
                f"--pid-file={m}/munged.pid",
                f"--log-file={m}/munged.log",
                f"--seed-file={m}/munged.seed",
                "--force",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise ClusterUnavailable(
                f"munged failed to start (exit {proc.returncode}): "
                f"{(proc.stderr or proc.stdout).strip()} {_tail(m / 'munged.log', 3)}"
            )

    def _spawn(self, name: str, cmd: list[str]) -> None:
        out = (self.root / "log" / f"{name}.out").open("wb")
        self.procs[name] = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            start_new_session=True,
        )

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise ClusterUnavailable(
                        f"{name} exited with status {p.returncode} at start-up: "
                        + _tail(self.root / "log" / f"{name}.out")
                    )
            r = subprocess.run(
                ["sinfo", "-h", "-N", "-o", "%N %t"],
                env=self.env,
                capture_output=True,
                text=True,
                check=False,
            )
            last = (r.stdout or r.stderr).strip()
            states = dict(line.split() for line in r.stdout.splitlines() if line.strip())
            if all(states.get(n, "").rstrip("*") == "idle" for n in NODES):
                return
            time.sleep(0.5)
        raise ClusterUnavailable(
            f"slurmd nodes did not become idle within {timeout:.0f} s (sinfo: {last!r}); "
            f"slurmctld log: {_tail(self.root / 'log' / 'slurmctld.log', 4)}"
        )

    def _smoke_job(self) -> None:
        """slurmd may register yet be unable to start jobs (e.g. missing privileges): try one."""
        try:
            r = subprocess.run(
                ["srun", f"--nodes={len(NODES)}", "--ntasks-per-node=1", "true"],
                env=self.env,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise ClusterUnavailable("a trivial `srun true` did not finish within 60 s") from None
        if r.returncode != 0:
            node_log = self.root / "log" / f"slurmd-{NODES[0]}.log"
            raise ClusterUnavailable(
                f"slurmd cannot start jobs here: `srun true` exited {r.returncode}: "
                f"{r.stderr.strip()[-500:]} | slurmd log: {_tail(node_log, 4)}"
            )

    def stop(self) -> None:
        """Stop the daemons this object started (by their pids) and munged (by its pid file)."""
        for p in self.procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        self.procs.clear()
        pid_file = self.root / "munge" / "munged.pid"
        if pid_file.exists():
            with contextlib.suppress(ValueError, ProcessLookupError):
                os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
            pid_file.unlink(missing_ok=True)

    # -- helpers for tests -------------------------------------------------------------------------

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, check=check)

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_state(
        self, job_id: str, states: set[str], timeout: float, poll: float = 0.5
    ) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout:.0f} s: {info}")


def _mem_mb() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 4000
