"""Fixtures for the launch tests: one tiny model and one uninterrupted torchrun run that every other
launch (ssh + pdsh, SLURM, preempted and resumed runs) must reproduce bit for bit; the real services.

The services need Debian's openssh-server, pdsh, slurm-wlm and munge, and root. Where they are
missing the tests that need them are skipped, unless ``MASKPRO_REQUIRE_CLUSTER=1`` (set by
``.ci/run``), where a missing prerequisite fails the test: CI must never pass by skipping them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.cluster import services
from tests.distributed.launch import REPO, torchrun, train_args
from tests.tiny import make_text, make_tiny_llama

CONFIG = REPO / "configs" / "tiny_debug.yaml"
# Steps are ~0.1 s each on 2 CPU ranks: 30 leave a few seconds after startup to deliver a signal mid-run.
STEPS = 30


def common_overrides(root: Path) -> dict[str, object]:
    """The run every launch repeats. One checkpoint (the last step) unless a stop writes another;
    plain kernels: the same bits as compiled ones (checked at run time), without ~10 s of compiling."""
    return dict(model__path=root / "model", data__source=root / "text.txt", data__cache_dir=root / "cache",
                train__steps=STEPS, checkpoint__every=1000, mask__kernels="plain")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> dict:
    """The tiny model and text, and a 2-rank torchrun run of STEPS steps (the reference)."""
    root = tmp_path_factory.mktemp("launch")
    make_tiny_llama(root / "model")
    make_text(root / "text.txt")
    reference = root / "torchrun"
    torchrun(2, train_args(CONFIG, train__run_dir=reference, **common_overrides(root)))
    return {"root": root, "reference": reference}


def run_args(tiny_run: dict, run_dir: Path) -> list[str]:
    return train_args(CONFIG, train__run_dir=run_dir, **common_overrides(tiny_run["root"]))


def require(binaries: tuple[str, ...]) -> None:
    """Skip (or fail under MASKPRO_REQUIRE_CLUSTER=1) when a binary or root is missing."""
    problems = [f"missing {', '.join(services.missing(binaries))}"] if services.missing(binaries) else []
    if os.geteuid() != 0:
        problems.append("not running as root (the daemons run as root and log in as root)")
    if not problems:
        return
    message = (f"{'; '.join(problems)}: install Debian's packages as root "
               f"(apt-get install -y {services.APT_PACKAGES}) or run .ci/run")
    if os.environ.get("MASKPRO_REQUIRE_CLUSTER") == "1":
        pytest.fail(f"MASKPRO_REQUIRE_CLUSTER=1 but {message}", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def ssh_hosts(tmp_path_factory):
    require(services.SSH_BINARIES)
    with services.ssh_hosts(tmp_path_factory.mktemp("sshd")) as hosts:
        yield hosts


@pytest.fixture(scope="session")
def slurm():
    require(services.SLURM_BINARIES)
    with services.slurm_cluster(cpus=max(2, os.cpu_count() or 1)) as cluster:
        yield cluster
