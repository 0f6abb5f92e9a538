"""The suite reaches loopback only: the guard refuses and records anything else, in the test
process and in the Python processes it starts."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests import network_guard

# Port 9 of "this host": were the guard broken, the attempt would still stay on this machine.
UNSPECIFIED = ("0.0.0.0", 9)  # noqa: S104 (connected to, never bound)


def test_addresses_outside_loopback_are_not_allowed() -> None:
    """Loopback addresses and the name localhost pass; any other address or name does not."""
    for host in ("127.0.0.1", "127.5.6.7", "::1", "[::1]", "localhost", b"localhost", "LOCALHOST."):
        assert network_guard.allowed_host(host), host
    outside = (UNSPECIFIED[0], "10.0.0.1", "169.254.169.254", "8.8.8.8", "::", "example.com", "", None)
    for host in outside:
        assert not network_guard.allowed_host(host), host


def test_a_connection_past_loopback_is_refused_and_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In the test process, a connect and a name lookup past loopback raise before any packet,
    and each lands in the guard's log (so a caller that swallows the error still fails the run)."""
    log = tmp_path / "guard.log"
    monkeypatch.setenv(network_guard.LOG_VARIABLE, str(log))
    with socket.socket() as sock, pytest.raises(PermissionError, match="loopback only"):
        sock.connect(UNSPECIFIED)
    with pytest.raises(PermissionError, match="loopback only"):
        socket.getaddrinfo("example.com", 443)
    socket.getaddrinfo("169.254.169.254", 80)  # a written-out address is parsed, not looked up
    recorded = log.read_text().splitlines()
    assert len(recorded) == 2
    assert "connect '0.0.0.0' port 9" in recorded[0] and "getaddrinfo 'example.com'" in recorded[1]


def test_loopback_connections_pass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection to a loopback listener goes through and records nothing."""
    log = tmp_path / "guard.log"
    monkeypatch.setenv(network_guard.LOG_VARIABLE, str(log))
    with socket.create_server(("127.0.0.1", 0)) as server, socket.create_connection(server.getsockname()[:2], 5):
        pass
    assert not log.exists()


def test_processes_the_tests_start_are_guarded(tmp_path: Path) -> None:
    """A Python child started with the suite's environment has the same hook from its first line."""
    log = tmp_path / "guard.log"
    code = f"import socket\nsocket.socket().connect({UNSPECIFIED!r})"
    env = {**os.environ, network_guard.LOG_VARIABLE: str(log)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "PermissionError" in done.stderr
    assert "connect '0.0.0.0' port 9" in log.read_text()



def test_an_attempt_in_a_test_worker_process_fails_the_run(tmp_path: Path) -> None:
    """`make test` spreads files over pytest-xdist workers, whose own exit status is not the run's: an
    attempt recorded in a worker still fails the run (and the run says so), as it does without workers."""
    probe = tmp_path / "test_probe.py"
    probe.write_text("import os\n\ndef test_reaches_out():\n"
                     f"    with open(os.environ[{network_guard.LOG_VARIABLE!r}], 'a') as log:\n"
                     "        log.write('connect 203.0.113.9 port 443\\n')\n")
    root = Path(__file__).resolve().parents[1]
    for spread in (["--numprocesses=1"], ["-p", "no:xdist"]):
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.suite_checks", *spread]
        done = subprocess.run([*command, str(probe)], cwd=root, capture_output=True, text=True, timeout=120)
        tail = done.stdout[-2000:]
        assert done.returncode == 1, (spread, tail)
        assert "1 passed" in tail and "reach past loopback: connect 203.0.113.9" in tail, tail
