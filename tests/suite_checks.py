"""The suite's own checks, as a pytest plugin (loaded by tests/conftest.py): every log line is
captured and no secret the suite uses may reach one; nothing may reach past loopback. A run fails
for either, with or without pytest-xdist's worker processes."""

from __future__ import annotations

import io
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest

from handler.config import library_environment, load_settings
from handler.logs import configure_logging
from tests import network_guard

# Every log line of the suite, the worker's and its libraries', goes here too.
CAPTURED_LOGS = io.StringIO()
# Strings that must never show up in CAPTURED_LOGS (checked when the session ends).
SECRETS: set[str] = set()
_SIGNATURE = re.compile(r"X-Amz-Signature=([0-9a-f]+)")
_secrets_lock = threading.Lock()


def remember_secret(value: str) -> str:
    with _secrets_lock:
        SECRETS.add(value)
    return value


def remember_presigned(result: Any) -> None:
    """Record the signatures of presigned URLs in a result as secrets."""
    for signature in _SIGNATURE.findall(str(result)):
        remember_secret(signature)


def pytest_configure(config: pytest.Config) -> None:
    configure_logging(level="DEBUG", stream=CAPTURED_LOGS)
    # As the worker's start-up does, before a model library is imported: with downloads off (as in
    # every test), they never reach the network.
    os.environ.update(library_environment(load_settings({"ALLOW_MODEL_DOWNLOAD": "false"})))
    _guard_network(config)


def _guard_network(config: pytest.Config) -> None:
    """Refuse every connection outside loopback, here and in every Python process the tests
    start (they inherit the environment), and record each attempt in one file for the session."""
    handle, name = tempfile.mkstemp(prefix="network-guard-", suffix=".log")
    os.close(handle)
    log = Path(name)
    config.stash[_GUARD_LOG] = log
    os.environ[network_guard.LOG_VARIABLE] = str(log)
    site = str(Path(network_guard.__file__).parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [site, os.environ.get("PYTHONPATH")]))
    network_guard.install()


_GUARD_LOG = pytest.StashKey[Path]()


def _suite_findings(session: pytest.Session) -> list[str]:
    """What this process saw: secrets used by the suite that reached a log line, attempts to reach
    past loopback (its own and its children's)."""
    logs = CAPTURED_LOGS.getvalue()
    findings = [f"SECRET LEAK: a secret appeared in the captured logs ({len(secret)} characters)"
                for secret in sorted(SECRETS) if secret in logs]
    guard_log = session.config.stash[_GUARD_LOG]
    findings += [f"NETWORK: an attempt to reach past loopback: {line}" for line in guard_log.read_text().splitlines()]
    guard_log.unlink()
    return findings


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if any secret used by the suite reached a log line, or if anything tried to
    reach past loopback. A pytest-xdist worker hands its findings to the controller (its own exit
    status is not the run's), which fails the run for them."""
    findings = _suite_findings(session) + session.config.stash.get(_WORKER_FINDINGS, [])
    worker_output = getattr(session.config, "workeroutput", None)
    if worker_output is not None:
        worker_output[_FINDINGS_KEY] = findings
        return
    if findings:
        print(f"\n{len(findings)} suite finding(s):", *findings[:20], sep="\n  ")
        session.exitstatus = 1


_FINDINGS_KEY = "suite_findings"
_WORKER_FINDINGS = pytest.StashKey[list[str]]()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """(pytest-xdist, in the controller) A worker finished: keep what it found for the run's end."""
    found = getattr(node, "workeroutput", {}).get(_FINDINGS_KEY, [])
    node.config.stash.setdefault(_WORKER_FINDINGS, []).extend(found)
