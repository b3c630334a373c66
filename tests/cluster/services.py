"""Real cluster services on this machine for the launch tests: sshd on two loopback "hosts", one-node SLURM.

Both are Debian's daemons (openssh-server; slurm-wlm with munge), configured in a private directory,
listening on loopback only, on free non-default ports, and stopped by the pids they wrote. Nothing
outside their directory is changed: the ssh user key is authorised through this sshd's own
``AuthorizedKeysFile`` (root's ~/.ssh is never touched), munged gets its own key and socket, and
slurmctld/slurmd their own state, spool and log paths. Every start is inside a context manager
whose exit stops what was started, also when the start itself failed half-way.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from maskpro_ds.train.local_launch import free_port

SSH_BINARIES = ("/usr/sbin/sshd", "ssh", "ssh-keygen", "pdsh")
SLURM_BINARIES = ("/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd", "sbatch", "scontrol", "squeue",
                  "scancel", "sinfo", "srun")
APT_PACKAGES = "openssh-server pdsh slurm-wlm munge"


def missing(binaries: tuple[str, ...]) -> list[str]:
    return [b for b in binaries if not (os.access(b, os.X_OK) if b.startswith("/") else shutil.which(b))]


def _wait_until(predicate, timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-3000:] if log is not None and log.is_file() else ""
    raise RuntimeError(f"{what} not ready after {timeout:.0f} s" + (f"\n--- {log}\n{tail}" if tail else ""))


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child of ours still "exists"; it has finished for our purpose.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def stop_pid_file(pid_file: Path, timeout: float = 10.0) -> None:
    """SIGTERM the daemon whose pid ``pid_file`` holds, SIGKILL it if it outlives ``timeout``."""
    try:
        pid = int(pid_file.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return
    if not _alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)


def _private_dir(prefix: str) -> Path:
    # munged wants every directory above its socket searchable by all; keep listing closed.
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o711)
    return path


# ------------------------------------------------------------------------------------------ sshd
@dataclass(frozen=True)
class SshHosts:
    """Two "hosts" (127.0.0.1, 127.0.0.2) served by one sshd, and how to reach them."""

    hosts: tuple[str, ...]
    port: int
    key: Path
    known_hosts: Path
    log: Path

    @property
    def ssh_options(self) -> list[str]:
        """Client options: our key only, strict checking against our known_hosts, never a prompt."""
        return ["-i", str(self.key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "StrictHostKeyChecking=yes"]

    def ssh(self, host: str, command: str) -> subprocess.CompletedProcess:
        return subprocess.run(["ssh", "-p", str(self.port), *self.ssh_options, host, command],
                              capture_output=True, text=True, timeout=30)


@contextlib.contextmanager
def ssh_hosts(workdir: Path, hosts: tuple[str, ...] = ("127.0.0.1", "127.0.0.2")) -> Iterator[SshHosts]:
    """Start sshd (root logins by key only) on ``hosts`` at a free port; stop it on exit."""
    workdir.mkdir(parents=True, exist_ok=True)
    host_key, user_key = workdir / "ssh_host_ed25519_key", workdir / "id_ed25519"
    for key in (host_key, user_key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "maskpro-test", "-f", str(key)],
                       check=True, capture_output=True)
    (workdir / "authorized_keys").write_text(user_key.with_suffix(".pub").read_text())
    port = free_port()
    host_pub = host_key.with_suffix(".pub").read_text().split()
    known = workdir / "known_hosts"
    known.write_text("".join(f"[{h}]:{port} {host_pub[0]} {host_pub[1]}\n" for h in hosts))
    pid_file, log = workdir / "sshd.pid", workdir / "sshd.log"
    config = workdir / "sshd_config"
    config.write_text("\n".join([
        f"Port {port}", *(f"ListenAddress {h}" for h in hosts), f"HostKey {host_key}", f"PidFile {pid_file}",
        # The key is authorised in this file only, so root's own ~/.ssh stays as it is. It lives
        # below /tmp, which StrictModes would reject (world-writable parent).
        f"AuthorizedKeysFile {workdir / 'authorized_keys'}", "StrictModes no",
        "PermitRootLogin prohibit-password", "PubkeyAuthentication yes", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "UsePAM no", "PrintMotd no", "LogLevel VERBOSE", "",
    ]))
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
    try:
        subprocess.run(["/usr/sbin/sshd", "-f", str(config), "-E", str(log)], check=True, capture_output=True,
                       text=True, timeout=30)
        _wait_until(lambda: pid_file.is_file() and all(_port_open(h, port) for h in hosts), 15, "sshd", log)
        yield SshHosts(hosts=hosts, port=port, key=user_key, known_hosts=known, log=log)
    finally:
        stop_pid_file(pid_file)


# ------------------------------------------------------------------------------------------ SLURM
@dataclass(frozen=True)
class SlurmCluster:
    """A running one-node SLURM cluster; ``env`` points the client commands at it."""

    root: Path
    conf: Path
    node: str

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def command(self, *args: str, env: dict[str, str] | None = None, timeout: float = 60) -> str:
        proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                              env={**(env or os.environ), **self.env})
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc.stdout

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, ...); works without slurmdbd."""
        out = self.command("scontrol", "show", "job", "--oneliner", job_id)
        return dict(field.split("=", 1) for field in out.split() if "=" in field)

    def wait_for(self, job_id: str, states: set[str], timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout:.0f} s "
                                   f"(Reason={info.get('Reason')}, Restarts={info.get('Restarts')})")
            time.sleep(0.25)


def _slurm_conf(root: Path, node: str, cpus: int) -> str:
    return "\n".join([
        "ClusterName=maskprotest", f"SlurmctldHost={node}(127.0.0.1)",
        f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
        "SlurmUser=root", "SlurmdUser=root",
        # cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
        "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={root / 'munge' / 'munge.socket'},cred_expire=5",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
        # Look at pending jobs every second (default 60 s), so a requeued job starts as soon as it may.
        "SchedulerType=sched/builtin", "SchedulerParameters=sched_interval=1",
        "JobRequeue=1", "ReturnToService=2", "SlurmdParameters=config_overrides",
        "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none",
        f"StateSaveLocation={root / 'state'}", f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}", f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
        f"NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN",
        f"PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP", "",
    ])


@contextlib.contextmanager
def slurm_cluster(cpus: int = 2) -> Iterator[SlurmCluster]:
    """munged + slurmctld + slurmd for one node with ``cpus`` CPUs (no GPUs); everything stopped on exit."""
    root = _private_dir("maskpro-slurm-")
    for sub in ("munge", "state", "spool", "log"):
        (root / sub).mkdir(mode=0o711)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    node = "localhost"
    conf = root / "slurm.conf"
    # config_overrides: the configured CPUs are used even on a machine with fewer cores.
    conf.write_text(_slurm_conf(root, node, max(cpus, 1)))
    cluster = SlurmCluster(root=root, conf=conf, node=node)
    env = {**os.environ, **cluster.env}
    munge_pid = root / "munge" / "munged.pid"
    try:
        subprocess.run(["/usr/sbin/munged", f"--key-file={key}", f"--socket={root / 'munge' / 'munge.socket'}",
                        f"--pid-file={munge_pid}", f"--seed-file={root / 'munge' / 'munged.seed'}",
                        f"--log-file={root / 'munge' / 'munged.log'}"], check=True, capture_output=True, text=True,
                       timeout=30)
        subprocess.run(["/usr/sbin/slurmctld", "-f", str(conf)], check=True, env=env, capture_output=True, timeout=30)
        subprocess.run(["/usr/sbin/slurmd", "-f", str(conf), "-N", node], check=True, env=env, capture_output=True,
                       timeout=30)

        def idle() -> bool:
            out = subprocess.run(["sinfo", "--noheader", "--format=%T"], capture_output=True, text=True, env=env)
            return out.returncode == 0 and out.stdout.strip() == "idle"

        _wait_until(idle, 30, "slurm node", root / "log" / "slurmctld.log")
        yield cluster
    finally:
        _stop_slurm(cluster, env, munge_pid)
        shutil.rmtree(root, ignore_errors=True)


def _stop_slurm(cluster: SlurmCluster, env: dict[str, str], munge_pid: Path) -> None:
    # Cancel whatever still runs so no job step outlives the daemons, then stop them by pid.
    root = cluster.root
    if (root / "slurmctld.pid").is_file():
        subprocess.run(["scancel", "--full", "--quiet", "--partition=debug"], env=env, capture_output=True, timeout=30)
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            out = subprocess.run(["squeue", "--noheader"], capture_output=True, text=True, env=env)
            if out.returncode != 0 or not out.stdout.strip():
                break
            time.sleep(0.5)
    stop_pid_file(root / "slurmd.pid")
    stop_pid_file(root / "slurmctld.pid")
    stop_pid_file(munge_pid)
