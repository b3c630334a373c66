"""The launch tests skip without their daemons on a developer machine, and fail loudly in CI."""

from __future__ import annotations

import pytest

from tests.cluster.conftest import require


def test_missing_binary_skips_outside_ci(monkeypatch):
    monkeypatch.delenv("MASKPRO_REQUIRE_CLUSTER", raising=False)
    with pytest.raises(pytest.skip.Exception, match="missing /nonexistent/sshd.*apt-get install -y openssh-server"):
        require(("/nonexistent/sshd",))


def test_missing_binary_fails_when_required(monkeypatch):
    monkeypatch.setenv("MASKPRO_REQUIRE_CLUSTER", "1")
    with pytest.raises(pytest.fail.Exception, match="MASKPRO_REQUIRE_CLUSTER=1 but missing no-such-binary"):
        require(("no-such-binary",))
