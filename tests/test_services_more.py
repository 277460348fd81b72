"""SCoT and relay end to end through the services (API, a Celery worker per queue, real
Postgres and Redis, the default model): each job succeeds, its stages ran on the queues of
their roles, and they match the same job run embedded."""

from __future__ import annotations

import pytest

from tests.test_services import SAME_IN_BOTH, Stack, stack  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.model]

QUESTION = "A box holds 3 red and 5 blue marbles. How many marbles are in 4 boxes?"
SCOT = {"drafts": 3, "draft_max_tokens": 8, "llm_max_tokens": 8, "seed": 3}
RELAY = {
    "relay_budget": 16,
    "relay_turns": 3,
    "relay_call_tokens": 3,
    "relay_entropy_threshold": 0.001,
}


def embedded(strategy: str, params: dict, settings):
    from services.core.engines import Engines
    from services.core.requests import parse_job_request
    from services.core.runner import run_job

    request = parse_job_request(
        {"question": QUESTION, "strategy": strategy, "params": params}, 8000
    )
    engines = Engines(settings)
    try:
        return run_job(request, engines)
    finally:
        engines.close()


def split_floats(summary: dict) -> tuple[dict, list[float]]:
    """The summary without its measured log-probs and entropies, and those values."""
    rest = {k: v for k, v in summary.items() if k != "choice_logprob"}
    floats = [summary["choice_logprob"]] if summary.get("choice_logprob") is not None else []
    if "handoffs" in summary:
        rest["handoffs"] = [
            {k: v for k, v in h.items() if k != "entropy"} for h in summary["handoffs"]
        ]
        floats += [h["entropy"] for h in summary["handoffs"] if "entropy" in h]
    return rest, floats


@pytest.mark.parametrize(("strategy", "params"), [("scot", SCOT), ("relay", RELAY)])
def test_job_through_the_queues_matches_the_embedded_run(
    stack: Stack,  # noqa: F811
    in_process_settings,
    strategy: str,
    params: dict,
) -> None:
    job = stack.wait(stack.submit(QUESTION, strategy=strategy, params=params)["id"])
    assert job["status"] == "succeeded", job["error"]
    stages = job["stages"]
    assert [s["seq"] for s in stages] == list(range(len(stages)))
    roles = {s["kind"]: s["role"] for s in stages}
    if strategy == "scot":
        assert [s["kind"] for s in stages[:4]] == ["draft"] * 3 + ["select"]
        assert roles["draft"] == "executor" and roles["select"] == "coordinator"
        assert job["summary"]["rejected"] == (stages[4]["kind"] == "solve")
    else:
        # A threshold of ~0 hands off at once on every turn but the last.
        assert [s["kind"] for s in stages] == ["small", "large"] * 2 + ["small"]
        assert roles["small"] == "executor" and roles["large"] == "coordinator"
        assert job["summary"]["mode"] == "entropy"
        assert job["summary"]["spent_tokens"] == job["cost"]["generated_tokens"] <= 16
    assert job["cost"]["generated_tokens"] == sum(s["generated_tokens"] for s in stages)
    assert job["cost"]["tflops"] == pytest.approx(sum(s["tflops"] for s in stages))

    local = embedded(strategy, params, in_process_settings)
    assert [{k: s[k] for k in SAME_IN_BOTH} for s in stages] == [
        {k: getattr(s, k) for k in SAME_IN_BOTH} for s in local.stages
    ]
    assert [s["output"].get("text") for s in stages] == [s.text for s in local.stages]
    # Another engine with another prefix-cache state and prefill chunking: log-probs and
    # entropies of the quantized model agree to ~0.1 nats, not bit for bit.
    service_summary, service_floats = split_floats(job["summary"])
    local_summary, local_floats = split_floats(local.outcome.summary)
    assert service_summary == local_summary
    assert service_floats == pytest.approx(local_floats, abs=0.5)
    assert job["answer"] == local.outcome.answer
