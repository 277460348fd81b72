"""Simulated SGLang servers in a bench's stack (`bench/sim_server.py`): stand-ins that take
a GPU engine's time, never models; they say nothing about any model's answers.

`serve` starts one for a role and points that role's workers at it as a deployment would:
backend `sglang`, its URL, its parameter count, and a chat template found in a Hugging
Face hub cache under the model id the simulator announces.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests import infra

SIM_SERVER = Path(__file__).resolve().parent / "sim_server.py"
# An R1-style template of our own (the generation prompt opens a think block); the
# simulators announce model ids that are looked up in a hub cache holding it.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}<|User|>{{ m['content'] }}"
    "{% else %}<|Assistant|>{{ m['content'] }}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|Assistant|><think>\n{% endif %}"
)


@dataclass(frozen=True)
class SimulatedModel:
    model_id: str  # what the simulator says it serves
    profile: str  # sim_server.py --profile
    n_params: int
    natural_tokens: str  # MIN:MAX, a request's length when max_tokens does not cut it


COORDINATOR_32B = SimulatedModel("sim/R1-Distill-Qwen-32B", "32b-h200", 32_763_876_352, "600:2400")
EXECUTOR_7B = SimulatedModel("sim/R1-Distill-Qwen-7B", "7b-h100", 7_615_616_512, "150:450")


def serve(
    processes: infra.Processes, role: str, model: SimulatedModel, hub: Path, *extra: str
) -> tuple[subprocess.Popen, str]:
    """Start a simulator for `role` (`extra`: more sim_server.py arguments), write its
    template into the hub cache `hub`, and set the role's settings in `processes.env` (for
    the processes started after this). Returns the simulator's process and URL."""
    snapshot = hub / f"models--{model.model_id.replace('/', '--')}" / "snapshots" / "0"
    snapshot.mkdir(parents=True, exist_ok=True)
    (snapshot / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": TEMPLATE, "bos_token": "<s>", "eos_token": "<|end|>"})
    )
    port = infra.free_port()
    process = processes.start(
        f"sim-{role}",
        [sys.executable, str(SIM_SERVER), "--port", str(port), "--profile", model.profile,
         "--model-path", model.model_id, "--natural-tokens", model.natural_tokens,
         "--add-bos", *extra],
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    infra.wait_for(
        lambda: httpx.get(f"{url}/health").status_code == 200, 30, f"the {role} simulator"
    )
    prefix = f"TANDEM_{role.upper()}"
    processes.env |= {
        "HF_HUB_CACHE": str(hub),
        f"{prefix}_BACKEND": "sglang",
        f"{prefix}_URL": url,
        f"{prefix}_PARAMS": str(model.n_params),
    }
    return process, url
