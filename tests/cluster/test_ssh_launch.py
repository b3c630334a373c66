"""``deepspeed --hostfile hosts launchers/train.py`` for real: one command reaches both hosts over ssh
through DeepSpeed's default pdsh runner, the ranks' environment comes from ``.deepspeed_env``, and the
final logits equal the torchrun run's bit for bit.

The two "hosts" are 127.0.0.1 and 127.0.0.2 served by a real sshd (tests/cluster/services.py).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess

import pytest

from tests.cluster.conftest import STEPS, run_args
from tests.cluster.runs import assert_same_logits, logged_steps
from tests.distributed.launch import BIN, TRAIN, base_env, free_port

pytestmark = [pytest.mark.cluster, pytest.mark.distributed]


def test_deepspeed_hostfile_over_ssh_matches_torchrun(tiny_run, ssh_hosts, tmp_path):
    for host in ssh_hosts.hosts:  # a clear message if ssh itself is broken, before DeepSpeed hides it
        probe = ssh_hosts.ssh(host, "true")
        assert probe.returncode == 0, f"ssh to {host}:{ssh_hosts.port} failed: {probe.stderr}"

    launch = tmp_path / "launch"  # the directory `deepspeed` runs in (shared by the "nodes" here)
    launch.mkdir()
    hostfile = launch / "hostfile"
    hostfile.write_text("".join(f"{h} slots=1\n" for h in ssh_hosts.hosts))
    # What the ranks on the other end of ssh need: a login shell has none of the caller's variables,
    # and DeepSpeed forwards only PYTHON*/UCX*/... by itself. One KEY=VALUE per line, nothing else.
    carried = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "TORCH_EXTENSIONS_DIR": os.environ["TORCH_EXTENSIONS_DIR"]}
    (launch / ".deepspeed_env").write_text("".join(f"{k}={v}\n" for k, v in carried.items()))

    run_dir = tmp_path / "run"
    # --no_ssh_check: DeepSpeed's pre-check runs a bare `ssh host`, which knows neither this test's key
    # nor its known_hosts (on a cluster they are in ~/.ssh and the check passes). The launch itself
    # goes through pdsh, which takes the same options from PDSH_SSH_ARGS_APPEND; --ssh_port adds -p.
    cmd = [str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--ssh_port", str(ssh_hosts.port), "--no_ssh_check",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), TRAIN, *run_args(tiny_run, run_dir)]
    env = base_env(PDSH_SSH_ARGS_APPEND=" ".join(ssh_hosts.ssh_options))
    proc = subprocess.Popen(cmd, cwd=launch, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # DeepSpeed's handler runs `pdsh ... pkill` on every host
        out, _ = proc.communicate(timeout=60)
        raise
    assert proc.returncode == 0, out[-6000:]

    # It went through pdsh over ssh to both addresses, each node running its own launcher.
    assert re.search(r"cmd = pdsh -S -f \d+ -w 127\.0\.0\.1,127\.0\.0\.2 ", out), out[-6000:]
    assert "deepspeed_env file = " in out
    for host in ssh_hosts.hosts:
        assert f"{host}: " in out  # pdsh prefixes each remote line with its host
    sshd_log = ssh_hosts.log.read_text()
    for host in ssh_hosts.hosts:
        assert re.search(rf"Connection from \S+ port \d+ on {re.escape(host)} port {ssh_hosts.port}", sshd_log)
    assert sshd_log.count("Accepted publickey for root") >= 2

    assert_same_logits(run_dir, tiny_run["reference"], STEPS)
    assert logged_steps(run_dir) == list(range(1, STEPS + 1))
