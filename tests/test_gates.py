"""Gates: recorded in the entry, raised when failing, and never passed by a value that is not a number."""

import math

import pytest

from edgeft.errors import EdgeftError, GateFailed
from edgeft.gates import GGUF_GATES, Gate, check, parse_gates, passed


def test_a_passing_gate_is_recorded():
    entry = {}
    check(entry, Gate("rise", 0.01, 0.02, "too much"))
    assert entry["gate"] == {"metric": "rise", "max": 0.02, "value": 0.01, "passed": True}
    assert entry["gates"] == [entry["gate"]] and passed(entry)


@pytest.mark.parametrize("value,absolute", [(0.03, False), (-0.03, True)])
def test_a_failing_gate_raises_with_its_message(value, absolute):
    entry = {}
    with pytest.raises(GateFailed, match="too much"):
        check(entry, Gate("rise", value, 0.02, "too much", absolute=absolute))
    assert entry["gate"]["passed"] is False and entry["gate"]["value"] == 0.03 and not passed(entry)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, None])
def test_a_value_that_is_not_a_number_fails_the_gate(value):
    """"NaN > limit" is False: a comparison alone would pass a broken model."""
    entry = {}
    with pytest.raises(GateFailed, match="not a number"):
        check(entry, Gate("rise", value, 0.02, "broken", absolute=True))
    assert entry["gate"]["passed"] is False and entry["gate"]["value"] is None


def test_an_extra_condition_can_fail_a_gate_within_its_limit():
    entry = {}
    with pytest.raises(GateFailed, match="answer"):
        check(entry, Gate("board vs host", 0.001, 0.02, "bad answer", also=False))
    assert entry["gate"]["passed"] is False


def test_every_gate_is_recorded_and_the_failures_named_together():
    """A quant has a general and two task gates: all are recorded, and the error names each one that failed."""
    entry = {}
    with pytest.raises(GateFailed) as e:
        check(entry, Gate("perplexity rise", 0.01, 0.15, "general"), Gate("task perplexity rise", 0.5, 0.1, "task ppl"),
              Gate("exact-answer drop", 0.4, 0.1, "exact answers"))
    assert str(e.value) == "task ppl; exact answers"
    assert [g["passed"] for g in entry["gates"]] == [True, False, False]
    assert entry["gate"]["metric"] == "perplexity rise" and not passed(entry)


def test_gate_specs():
    made = ["q8_0", "q4_k_m", "q2_k"]
    assert parse_gates("", GGUF_GATES, made, 0.15) == {"q8_0": 0.02, "q4_k_m": 0.15, "q2_k": 0.15}
    assert parse_gates("0.5", GGUF_GATES, made) == {q: 0.5 for q in made}
    assert parse_gates("q8_0=0.01", GGUF_GATES, made, 0.15)["q8_0"] == 0.01
    with pytest.raises(EdgeftError, match="'q6_k' is not among"):
        parse_gates("q6_k=0.1", GGUF_GATES, made)
    with pytest.raises(EdgeftError, match="'x' is not a number"):
        parse_gates("q8_0=x", GGUF_GATES, made)


def test_a_task_gate_spec_error_names_its_own_flag():
    """The task gates share the syntax of --max-ppl-rise; a mistake in one must name the flag the user typed."""
    from types import SimpleNamespace

    from edgeft.export.checks import task_gate_limits

    made = ["q8_0", "q4_k_m"]
    with pytest.raises(EdgeftError, match=r"^--max-task-ppl-rise q5_0=0.1: 'q5_0' is not among"):
        task_gate_limits(SimpleNamespace(max_task_ppl_rise="q5_0=0.1", max_exact_drop=""), made)
    with pytest.raises(EdgeftError, match=r"^--max-exact-drop q8_0=lots: 'lots' is not a number"):
        task_gate_limits(SimpleNamespace(max_task_ppl_rise="", max_exact_drop="q8_0=lots"), made)


def test_a_measurement_without_a_limit_must_still_be_a_number():
    entry = {}
    check(entry, Gate("perplexity", 14.9, None, "broken"))
    assert entry["gate"] == {"metric": "perplexity", "max": None, "value": 14.9, "passed": True}
    with pytest.raises(GateFailed, match="broken.*not a number"):
        check({}, Gate("perplexity", math.nan, None, "broken"))
