"""The models and policies a process holds, loaded on first use from settings.

A role (coordinator, executor, classifier: `steps.Role`) runs on the model
`Settings.model(role)` names; the classifier's is the feature model, configured by
TANDEM_FEATURE_* (see `settings.ENV_PREFIX`). Roles whose settings name the same engine
(same backend, model and URL) share one loaded engine: in embedded mode the coordinator,
executor and feature model are all the default SmolLM2 and it is loaded once. A worker
loads only the roles its queue needs.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path

from services.core.backends.base import Backend, BackendError, ConfigurationError
from services.core.classifier import trained_policy
from services.core.sufficiency import EntropyPolicy, SufficiencyPolicy
from services.settings import ModelSettings, Role, Settings


class Engines:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._backends: dict[tuple, Backend] = {}
        self._policies: dict[str, SufficiencyPolicy] = {}
        self._lock = threading.Lock()

    def backend(self, role: Role) -> Backend:
        model = self.settings.model(role)
        with self._lock:
            if model.engine_key not in self._backends:
                self._backends[model.engine_key] = self._load(model)
            return self._backends[model.engine_key]

    def n_params(self, role: Role) -> int:
        """Parameter count for the cost model: the settings' override, else the model's own."""
        return self.settings.model(role).n_params or self.backend(role).n_params

    def policy(self, name: str | None) -> SufficiencyPolicy:
        """`entropy` (training-free), `trained` (the configured artifact), or None: trained
        when an artifact is configured, else entropy."""
        if name is None:
            name = "trained" if self.settings.classifier_artifact else "entropy"
        with self._lock:
            if name not in self._policies:
                self._policies[name] = self._load_policy(name)
            return self._policies[name]

    def close(self) -> None:
        with self._lock:
            for backend in self._backends.values():
                backend.close()
            self._backends.clear()

    def _load(self, model: ModelSettings) -> Backend:
        if model.backend == "torch":  # scoring only: the classifier's feature model
            from services.core.backends.torch_scoring import load_feature_backend

            return load_feature_backend(model)
        if model.backend == "local":
            from services.core.backends.default_model import default_model_path
            from services.core.backends.local import LocalBackend
            from services.core.backends.weights import prepare_weights

            path = default_model_path() if model.model == "default" else Path(model.model)
            cache = Path(self.settings.model_cache) if self.settings.model_cache else None
            return LocalBackend(
                prepare_weights(path, self.settings.local_weights, cache),
                n_threads=self.settings.local_threads,
                max_batch=self.settings.local_max_batch,
                n_ctx=self.settings.local_context,
                interactive_step_tokens=self.settings.local_interactive_step_tokens,
                name="SmolLM2-135M-Instruct" if model.model == "default" else path.stem,
            )
        # "sglang" names the server a deployment runs; what this process needs is its
        # protocol, OpenAI-compatible completions, which llama.cpp's and vLLM's servers
        # speak too. The value stays "sglang": deployments and users have it set.
        if not model.url:
            raise ConfigurationError(
                f"the {model.role} model uses the sglang backend but has no URL: "
                f"set {model.env_prefix}_URL=http://host:port"
            )
        from services.core.backends.openai_http import OpenAIHTTPBackend
        from services.core.backends.template_source import TemplateSource

        return OpenAIHTTPBackend(
            model.url,
            model_name=None if model.model == "default" else model.model,
            n_params=model.n_params,
            chat_template=TemplateSource.for_role(
                model.role,
                model.chat_template,
                model.model,
                self.settings.hf_hub_cache,
                self.settings.hf_home,
            ),
            timeout_s=self.settings.http_timeout_s,
            connect_timeout_s=self.settings.http_connect_timeout_s,
            retries=self.settings.http_retries,
            vocab_size=self.settings.http_vocab_size,
            role=model.role,
            api_key=model.api_key,
        )

    def _load_policy(self, name: str) -> SufficiencyPolicy:
        if name == "entropy":
            return EntropyPolicy()
        if name == "trained":
            return trained_policy(self.settings)
        raise ConfigurationError(f"unknown classifier policy {name!r}: use 'entropy' or 'trained'")


def read_chat_template(path: str) -> str:
    """A chat template from a Hugging Face tokenizer_config.json, a template file, a model
    directory or a GGUF file."""
    from services.core.backends.template_source import read_template_path

    return read_template_path(Path(path), "").text


CHAT_ROLES = frozenset({"coordinator", "executor"})  # the roles that render chat prompts


def check_served_templates(settings: Settings, queues: Iterable[str]) -> list[str]:
    """At a worker's start: find the chat template of every served model whose prompts
    this worker renders (its queues' roles), so a missing one stops the worker with one
    line (`ChatTemplateNotFound`) instead of failing jobs later. A model server that does
    not answer yet is left for the first stage to ask again. Returns one line per role
    saying where its template came from, or why it could not be checked now."""
    # A queue is named after its role, and its lanes after the queue (services/queues.py).
    roles = sorted({queue.split(".", 1)[0] for queue in queues} & CHAT_ROLES)
    served = [r for r in roles if settings.model(r).backend == "sglang"]
    if not served:
        return []
    engines = Engines(settings)
    lines = []
    try:
        for role in served:
            backend = engines.backend(role)
            try:
                lines.append(
                    f"{role} prompts use the chat template from {backend.chat_template_origin()}"
                )
            except ConfigurationError:
                raise
            except BackendError as error:  # e.g. the server does not answer yet
                lines.append(f"{role} chat template not checked at start: {error}")
    finally:
        engines.close()
    return lines
