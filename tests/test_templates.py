"""Each role's prompts use the served model's own chat template, found without a manual step.

- where a template is found (`template_source.py`): the setting, a model directory, a GGUF
  file, the Hugging Face hub cache layout, the order of the candidates, and one-line
  errors naming the setting when nothing is found;
- the whole flow with R1-style templates (the generation prompt opens a `<think>` block)
  of our own, with distinctive markers, served for real by two llama.cpp servers (a
  "large" coordinator and a "small" executor, each given its template and announcing a
  model id that is looked up in a hub cache): a recording proxy between our backend and
  each server keeps what the server received, and each role's prompt is asserted to the
  character: Tandem's coordinator stages and their continuation, the classifier's scoring
  text, the executor's prompt with thinking tags stripped, SCoT's drafts (stopping at
  `</think>`), selection and finish, relay's hand-offs;
- against the simulated SGLang server: a BOS the template writes is dropped when the
  server adds its own, and a worker whose model has no findable template refuses to start
  with one line naming the setting.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from services.core.backends.template_source import (
    ChatTemplateNotFound,
    ServedModel,
    TemplateSource,
    find_model_template,
    hub_cache_dirs,
    read_template_path,
)
from services.core.engines import ConfigurationError
from tests.infra import BIN, ROOT
from tests.llama_server import LlamaServer, RecordingProxy, SimServer

BOS, EOS = "<|endoftext|>", "<|im_end|>"


def r1_template(tag: str) -> str:
    """An R1-style template with markers of our own: the generation prompt opens a think
    block, and assistant history keeps only what follows `</think>` (as R1's does)."""
    return (
        "{{ bos_token }}{% for m in messages %}"
        "{% if m['role'] == 'system' %}[" + tag + ":SYS]{{ m['content'] }}[/" + tag + ":SYS]"
        "{% elif m['role'] == 'user' %}[" + tag + ":USER]{{ m['content'] }}"
        "{% elif m['role'] == 'assistant' %}{% set c = m['content'] %}"
        "{% if '</think>' in c %}{% set c = c.split('</think>')[-1] %}{% endif %}"
        "[" + tag + ":ASSISTANT]{{ c }}{{ eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}[" + tag + ":ASSISTANT]<think>\n{% endif %}"
    )


def hub_snapshot(hub: Path, repo: str, files: dict[str, str], rev: str = "0123abcd") -> Path:
    """A Hugging Face hub cache entry (`models--org--name/snapshots/<rev>/`, refs/main)."""
    entry = hub / f"models--{repo.replace('/', '--')}"
    snapshot = entry / "snapshots" / rev
    snapshot.mkdir(parents=True, exist_ok=True)
    (entry / "refs").mkdir(exist_ok=True)
    (entry / "refs" / "main").write_text(rev)
    for name, text in files.items():
        (snapshot / name).write_text(text)
    return snapshot


def config(template: str, bos: object = BOS, eos: object = EOS) -> str:
    return json.dumps({"chat_template": template, "bos_token": bos, "eos_token": eos})


# --- where templates are found ------------------------------------------------------------


def test_a_model_directory_prefers_chat_template_jinja(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text(
        config("from-config", bos={"content": "<s>", "lstrip": False}, eos="</s>")
    )
    assert read_template_path(tmp_path, "X").text == "from-config"
    (tmp_path / "chat_template.jinja").write_text("from-jinja")
    found = read_template_path(tmp_path, "X")
    assert (found.text, found.bos_token, found.eos_token) == ("from-jinja", "<s>", "</s>")
    assert found.origin == str(tmp_path / "chat_template.jinja")


def test_named_templates_and_chat_template_json(tmp_path: Path) -> None:
    named = tmp_path / "named.json"
    named.write_text(
        json.dumps(
            {
                "chat_template": [
                    {"name": "tool_use", "template": "tools"},
                    {"name": "default", "template": "plain"},
                ]
            }
        )
    )
    assert read_template_path(named, "X").text == "plain"
    processor = tmp_path / "processor"
    processor.mkdir()
    (processor / "chat_template.json").write_text(json.dumps({"chat_template": "vision"}))
    assert read_template_path(processor, "X").text == "vision"


def test_a_gguf_file_gives_its_own_template(model_path: Path) -> None:
    found = read_template_path(model_path, "X")
    assert "<|im_start|>" in found.text and found.origin == str(model_path)
    assert found.bos_token and found.eos_token == "<|im_end|>"


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (None, "cannot read chat template"),
        ("{not json", "not valid JSON"),
        (json.dumps({"bos_token": "<s>"}), "has no chat_template"),
    ],
)
def test_unusable_files_name_the_setting(tmp_path: Path, content, fragment) -> None:
    path = tmp_path / "tokenizer_config.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigurationError, match=fragment) as error:
        read_template_path(path, "TANDEM_EXECUTOR_CHAT_TEMPLATE")
    assert "TANDEM_EXECUTOR_CHAT_TEMPLATE" in str(error.value)
    assert "\n" not in str(error.value)


def test_hub_cache_layout_follows_refs_main(tmp_path: Path) -> None:
    pinned = hub_snapshot(tmp_path, "org/Model", {"tokenizer_config.json": config("pinned")})
    newer = tmp_path / "models--org--Model" / "snapshots" / "ffff"
    newer.mkdir()
    (newer / "tokenizer_config.json").write_text(config("newer"))
    found = find_model_template("org/Model", [tmp_path])
    assert found is not None and found.text == "pinned"
    assert found.origin == str(pinned / "tokenizer_config.json")
    (tmp_path / "models--org--Model" / "refs" / "main").unlink()  # no ref: newest snapshot
    os.utime(newer, (time.time() + 10, time.time() + 10))
    assert find_model_template("org/Model", [tmp_path]).text == "newer"  # type: ignore[union-attr]
    assert find_model_template("org/Other", [tmp_path]) is None
    assert find_model_template("/models/not/here", [tmp_path]) is None


def test_hub_cache_dirs_follow_the_hub_variables(tmp_path: Path) -> None:
    assert hub_cache_dirs(str(tmp_path / "hub"), str(tmp_path / "home")) == (tmp_path / "hub",)
    assert hub_cache_dirs(None, str(tmp_path / "home")) == (tmp_path / "home" / "hub",)
    assert hub_cache_dirs() == (Path.home() / ".cache" / "huggingface" / "hub",)


def test_resolution_order(tmp_path: Path) -> None:
    hub_snapshot(tmp_path, "org/Served", {"chat_template.jinja": "served"})
    hub_snapshot(tmp_path, "org/Configured", {"chat_template.jinja": "configured"})
    explicit = tmp_path / "mine.jinja"
    explicit.write_text("explicit")
    source = TemplateSource.for_role("executor", None, "org/Configured", str(tmp_path))
    served = ServedModel(ids=("org/Served",))
    assert source.resolve(served).text == "served"  # what the server serves comes first
    assert source.resolve(ServedModel(ids=("org/Unknown",))).text == "configured"
    exposed = ServedModel(ids=("org/Served",), template="exposed", bos_token="<b>")
    assert source.resolve(exposed).text == "exposed"  # a template the server exposes
    pinned = TemplateSource.for_role("executor", str(explicit), "org/Configured", str(tmp_path))
    assert pinned.resolve(exposed).text == "explicit"  # the setting wins over everything
    assert not pinned.needs_server


def test_nothing_found_is_one_line_naming_the_setting(tmp_path: Path) -> None:
    source = TemplateSource.for_role("coordinator", None, "default", str(tmp_path))
    with pytest.raises(ChatTemplateNotFound) as error:
        source.resolve(ServedModel(ids=("org/Nowhere",)), "http://gpu:30000")
    message = str(error.value)
    assert "\n" not in message
    assert "'org/Nowhere'" in message and "http://gpu:30000" in message
    assert "set TANDEM_COORDINATOR_CHAT_TEMPLATE" in message and str(tmp_path) in message


# --- the whole flow, served for real -----------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Two llama.cpp servers (coordinator 'large', executor 'small'), each given its own
    R1-style template and announcing a model id found in a hub cache; a recording proxy
    in front of each; engines configured as in a GPU deployment (backend sglang, URLs)."""
    from services.core.engines import Engines
    from services.settings import Settings

    hub = tmp_path_factory.mktemp("hub")
    roles = {
        "coordinator": ("L", "tandem-test/R1-Large"),
        "executor": ("S", "tandem-test/R1-Small"),
    }
    servers, proxies = {}, {}
    try:
        for role, (tag, repo) in roles.items():
            snapshot = hub_snapshot(hub, repo, {"tokenizer_config.json": config(r1_template(tag))})
            servers[role] = LlamaServer(
                n_threads=1,
                extra_args=[
                    "--model_alias", repo,
                    "--chat_format", "hf-tokenizer-config",
                    "--hf_tokenizer_config_path", str(snapshot / "tokenizer_config.json"),
                ],
            ).start()  # fmt: skip
            proxies[role] = RecordingProxy(servers[role].url)
        settings = Settings(
            coordinator_backend="sglang",
            coordinator_url=proxies["coordinator"].url,
            coordinator_params=1_000_000_000,
            executor_backend="sglang",
            executor_url=proxies["executor"].url,
            executor_params=135_000_000,
            hf_hub_cache=str(hub),
        )
        engines = Engines(settings)
        yield engines, proxies, servers
        engines.close()
    finally:
        for proxy in proxies.values():
            proxy.close()
        for server in servers.values():
            server.stop()


def render(tag: str, system: str | None, user: str) -> str:
    """What the R1-style template renders for [system], user + generation prompt, written
    out by hand (not through our renderer)."""
    sys_part = f"[{tag}:SYS]{system}[/{tag}:SYS]" if system is not None else ""
    return f"{BOS}{sys_part}[{tag}:USER]{user}[{tag}:ASSISTANT]<think>\n"


def generated(proxy: RecordingProxy) -> list[dict]:
    """Generation requests the server received (scoring echoes left out)."""
    return [
        b
        for b in proxy.bodies("/v1/completions")
        if not b.get("echo") and b["prompt"] != "Question"
    ]


QUESTION = "What is 2+3?"


def run(served, strategy: str, params: dict):
    from services.core.requests import parse_job_request
    from services.core.runner import run_job

    engines, proxies, _ = served
    for proxy in proxies.values():
        proxy.clear()
    request = parse_job_request(
        {"question": QUESTION, "strategy": strategy, "params": params}, 8000
    )
    return run_job(request, engines)


def test_templates_come_from_the_served_models(served) -> None:
    engines, _, _ = served
    for role in ("coordinator", "executor"):
        origin = engines.backend(role).chat_template_origin()
        assert origin.endswith(
            f"models--tandem-test--R1-{'Large' if role == 'coordinator' else 'Small'}/snapshots/0123abcd/tokenizer_config.json"
        )


def test_tandem_prompts(served) -> None:
    from services.core.prompts import (
        COORDINATOR_SYSTEM,
        EXECUTOR_SYSTEM,
        classifier_text,
        executor_messages,
    )

    result = run(served, "tandem", {"budgets": [8, 16], "executor_max_tokens": 12})
    _, proxies, _ = served
    coordinator = generated(proxies["coordinator"])
    first = render(
        "L",
        COORDINATOR_SYSTEM,
        f"Problem:\n{QUESTION}\n\nWrite the thinking insights (Goal, Planning, Retrieval, Action).",
    )
    stages = [s for s in result.stages if s.kind == "coordinator"]
    assert coordinator and len(coordinator) == len(stages)
    insights = ""
    for body, stage in zip(coordinator, stages, strict=True):
        assert body["prompt"] == first + insights  # the same stream, continued
        insights += stage.output["text"]
    scored = [b["prompt"] for b in proxies["executor"].bodies("/v1/completions") if b.get("echo")]
    judged = [s for s in result.stages if s.kind == "classifier"]
    assert len(scored) == len(judged) >= 1
    assert scored[0] == classifier_text(QUESTION, stages[0].output["text"])
    assert "[S:" not in scored[0] and "[L:" not in scored[0]  # raw text, no template
    [executor] = generated(proxies["executor"])
    user = executor_messages(QUESTION, insights)[1]["content"]
    assert executor["prompt"] == render("S", EXECUTOR_SYSTEM, user)


def test_the_executor_prompt_drops_thinking_tags(served) -> None:
    """An R1 coordinator's insights carry thinking tags (it closes its think block before
    it writes more); the executor sees the insights without them."""
    from services.core.execution import execute
    from services.core.params import JobParams
    from services.core.prompts import EXECUTOR_SYSTEM, GPRA_PARTS
    from services.core.strategies.tandem import executor_step

    engines, proxies, _ = served
    proxies["executor"].clear()
    insights = "Okay, 2 and 3.\n</think>\n\nGoal: the sum.<think> Action: 2+3=5."
    execute(
        7, executor_step(QUESTION, insights, JobParams(executor_max_tokens=4)), engines, JobParams()
    )
    [body] = generated(proxies["executor"])
    glossary = "\n".join(f"- {name}: {gloss}" for name, gloss in GPRA_PARTS)
    user = (
        f"{QUESTION}\n\n[Thinking Insights]\n"
        f"A stronger model started on this problem. Its insights may cover:\n{glossary}\n\n"
        "Okay, 2 and 3.\n\n\nGoal: the sum. Action: 2+3=5.\n\n"
        "Use the insights, check them, finish the reasoning yourself. Put the final answer in \\boxed{}."
    )
    assert body["prompt"] == render("S", EXECUTOR_SYSTEM, user)
    assert body["prompt"].count("<think>") == 1  # only the template's own, at the end


def test_scot_prompts(served) -> None:
    from services.core.prompts import SOLVER_SYSTEM, selection_messages
    from services.core.strategies.scot import draft_prefix

    result = run(served, "scot", {"drafts": 2, "draft_max_tokens": 16, "llm_max_tokens": 8})
    _, proxies, _ = served
    solver_user = f"{QUESTION}\n\nPut the final answer in \\boxed{{}}."
    drafts = generated(proxies["executor"])
    assert len(drafts) == 2
    for body in drafts:
        assert body["prompt"] == render("S", SOLVER_SYSTEM, solver_user)
        assert body["stop"] == ["</think>"]  # drafts stop at the end of thinking
    draft_records = [s for s in result.stages if s.kind == "draft"]
    messages, cue = selection_messages(QUESTION, [d.output["text"] for d in draft_records])
    select, last = generated(proxies["coordinator"])
    assert select["prompt"] == render("L", None, messages[0]["content"]) + cue
    assert select["max_tokens"] == 1 and select["logprobs"] == 20
    summary = result.outcome.summary
    if summary["selected"] is not None:  # accepted: finish after the chosen draft
        chosen = draft_records[summary["selected"] - 1]
        assert last["prompt"] == render("L", SOLVER_SYSTEM, solver_user) + draft_prefix(chosen)
        if chosen.output["finish_reason"] == "stop":
            assert last["prompt"].endswith("\n</think>\n\n")
    else:  # rejected: the coordinator solves from scratch
        assert last["prompt"] == render("L", SOLVER_SYSTEM, solver_user)


def test_relay_prompts(served) -> None:
    from services.core.prompts import SOLVER_SYSTEM
    from services.core.strategies.relay import without_commands

    result = run(
        served,
        "relay",
        {"relay_budget": 40, "relay_call_tokens": 4, "relay_entropy_threshold": 1.0},
    )
    _, proxies, _ = served
    solver_user = f"{QUESTION}\n\nPut the final answer in \\boxed{{}}."
    small = generated(proxies["executor"])
    large = generated(proxies["coordinator"])
    assert small and large, "at least one hand-off each way"
    solution = ""
    small_at = large_at = 0
    for stage in result.stages:
        if stage.kind == "small":
            assert small[small_at]["prompt"] == render("S", SOLVER_SYSTEM, solver_user) + solution
            small_at += 1
        else:
            prompt = render("L", SOLVER_SYSTEM, solver_user) + without_commands(solution)
            assert large[large_at]["prompt"] == prompt
            large_at += 1
        solution += stage.output["text"]
    assert (small_at, large_at) == (len(small), len(large))


# --- SGLang-only parts, against the simulated server --------------------------------------


@pytest.mark.parametrize("server_adds_bos", [True, False])
def test_a_bos_the_server_adds_is_not_written_twice(tmp_path: Path, server_adds_bos) -> None:
    from services.core.backends.openai_http import OpenAIHTTPBackend

    hub_snapshot(tmp_path, "org/R1", {"tokenizer_config.json": config(r1_template("R"), bos="<s>")})
    args = ["--model-path", "org/R1"] + (["--add-bos"] if server_adds_bos else [])
    with SimServer(*args) as sim:
        source = TemplateSource.for_role("executor", None, None, str(tmp_path))
        with OpenAIHTTPBackend(sim.url, chat_template=source, role="executor") as backend:
            prompt = backend.chat_prompt([{"role": "user", "content": "hi"}])
    written = "" if server_adds_bos else "<s>"
    assert prompt == f"{written}[R:USER]hi[R:ASSISTANT]<think>\n"


def _worker(queue: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "celery"), "-A", "workers", "worker", "-Q", queue, "--pool", "threads",
         "--concurrency", "2", "--without-gossip", "--without-mingle", "--without-heartbeat"],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


@pytest.mark.timeout(180)
def test_a_worker_without_a_template_refuses_to_start(tmp_path: Path, redis_url: str) -> None:
    with SimServer("--model-path", "org/Unknown-R1") as sim:
        env = {
            **os.environ,
            "TANDEM_REDIS_URL": redis_url,
            "TANDEM_EXECUTOR_BACKEND": "sglang",
            "TANDEM_EXECUTOR_URL": sim.url,
            "TANDEM_EXECUTOR_PARAMS": "7000000000",
            "HF_HUB_CACHE": str(tmp_path),
        }
        process = _worker("executor", env)
        _, stderr = process.communicate(timeout=120)
    assert process.returncode == 78
    lines = [line for line in stderr.splitlines() if line.startswith("tandem worker:")]
    assert len(lines) == 1, stderr
    assert "'org/Unknown-R1'" in lines[0] and "TANDEM_EXECUTOR_CHAT_TEMPLATE" in lines[0]
    assert "Traceback" not in stderr


@pytest.mark.timeout(180)
def test_a_worker_finds_its_template_in_the_hub_cache(tmp_path: Path, redis_url: str) -> None:
    snapshot = hub_snapshot(tmp_path, "org/Known-R1", {"chat_template.jinja": r1_template("K")})
    with SimServer("--model-path", "org/Known-R1") as sim:
        env = {
            **os.environ,
            "TANDEM_REDIS_URL": redis_url,
            "TANDEM_COORDINATOR_BACKEND": "sglang",
            "TANDEM_COORDINATOR_URL": sim.url,
            "TANDEM_COORDINATOR_PARAMS": "32000000000",
            "HF_HUB_CACHE": str(tmp_path),
        }
        process = _worker("coordinator", env)
        try:
            seen = ""
            deadline = time.monotonic() + 120
            while "prompts use the chat template" not in seen and time.monotonic() < deadline:
                line = process.stderr.readline()  # type: ignore[union-attr]
                if not line:
                    break
                seen += line
        finally:
            process.kill()
            process.communicate(timeout=30)
    assert (
        f"coordinator prompts use the chat template from {snapshot / 'chat_template.jinja'}" in seen
    )
