"""The worker's lifecycle: one state, checked transitions, and what each state answers a new job."""

from __future__ import annotations

import pytest

from handler.errors import Cancelled, CudaFatal
from handler.runtime.lifecycle import Lifecycle, State


def test_serving_admits_jobs() -> None:
    """A new worker serves: admission raises nothing."""
    lifecycle = Lifecycle()
    assert lifecycle.state is State.SERVING
    lifecycle.admit()


def test_draining_refuses_with_cancelled_and_never_serves_again() -> None:
    """After SIGTERM new jobs get CANCELLED (retryable elsewhere); a later fatal error changes nothing."""
    lifecycle = Lifecycle()
    assert lifecycle.drain() is True
    assert lifecycle.drain() is False
    lifecycle.fail(CudaFatal("late"))
    assert lifecycle.state is State.DRAINING
    with pytest.raises(Cancelled):
        lifecycle.admit()


def test_fatal_refuses_with_its_message_then_drains() -> None:
    """After a sticky CUDA error jobs get CUDA_FATAL with the first error's message; SIGTERM still drains."""
    lifecycle = Lifecycle()
    lifecycle.fail(CudaFatal("illegal memory access"))
    lifecycle.fail(CudaFatal("second"))
    with pytest.raises(CudaFatal, match="illegal memory access"):
        lifecycle.admit()
    assert lifecycle.drain() is True
    assert lifecycle.state is State.DRAINING


def test_late_errors_mark_only_when_sticky() -> None:
    """A late ordinary error is only logged; a late sticky CUDA error marks the worker fatal."""
    lifecycle = Lifecycle()
    lifecycle.late_error(RuntimeError("boom"))
    assert lifecycle.state is State.SERVING
    lifecycle.late_error(CudaFatal("sticky"))
    assert lifecycle.state is State.FATAL
