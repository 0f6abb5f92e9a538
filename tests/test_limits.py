"""The checks tasks share: which model a job gets, and the message when it names one not served."""

from __future__ import annotations

import pytest

from handler.errors import InvalidInput
from handler.limits import served_model


def test_a_job_gets_the_default_another_served_model_or_an_alias_target() -> None:
    """No name is the default; a served name is itself; an alias is the model it maps to."""
    options = {"others": ("base", "small"), "aliases": (("whisper-1", "base"),)}
    assert served_model(None, "tiny.en", **options) == "tiny.en"
    assert served_model("tiny.en", "tiny.en", **options) == "tiny.en"
    assert served_model("small", "tiny.en", **options) == "small"
    assert served_model("whisper-1", "tiny.en", **options) == "base"


def test_one_served_model_is_named_in_the_refusal() -> None:
    """A worker serving one model for a task says which; an empty name is a name, not the default."""
    for requested in ("other", ""):
        with pytest.raises(InvalidInput, match=r"model: '.*' is not served here; use 'tiny-sd'") as refused:
            served_model(requested, "tiny-sd")
        assert refused.value.field == "model"


def test_several_are_listed_and_the_requested_name_is_escaped() -> None:
    """The refusal lists every accepted name, aliases included; a name with control characters is
    echoed escaped and cut short."""
    with pytest.raises(InvalidInput) as refused:
        served_model("evil\n\x1b[31m" + "x" * 500, "tiny.en", others=("base",), aliases=(("whisper-1", "base"),))
    message = refused.value.message
    assert "one of tiny.en, base, whisper-1" in message
    assert "\n" not in message and "\x1b" not in message and len(message) < 300
