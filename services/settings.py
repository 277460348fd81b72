"""One typed settings object, read from TANDEM_* environment variables.

Every variable is documented in README.md ("Configuration"). Nothing else in the code
reads the environment.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

BackendKind = Literal["local", "sglang", "torch"]  # torch: feature model only
Role = Literal["coordinator", "executor", "feature"]


@dataclass(frozen=True)
class ModelSettings:
    """Where one role's model lives."""

    role: str
    backend: BackendKind
    model: str  # "default" (the packaged SmolLM2 GGUF), a GGUF path, or a model id / HF path
    url: str | None  # base URL of the OpenAI-compatible server (backend "sglang")
    n_params: int | None  # parameter count override for the cost model
    # Where a served model's chat template comes from: a tokenizer_config.json, a .jinja
    # file, a model directory, or None: found from the served model (template_source.py).
    chat_template: str | None = None

    @property
    def engine_key(self) -> tuple[str, str, str | None]:
        """Roles with the same key share one loaded engine."""
        return (self.backend, self.model, self.url)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TANDEM_", extra="ignore")

    # Storage and broker
    database_url: str = "sqlite:///tandem.db"
    redis_url: str = "redis://127.0.0.1:6379/0"

    # Models, one block per role. The feature model (classifier scoring) defaults to the executor's.
    coordinator_backend: BackendKind = "local"
    coordinator_model: str = "default"
    coordinator_url: str | None = None
    coordinator_params: int | None = None
    coordinator_chat_template: str | None = None
    executor_backend: BackendKind = "local"
    executor_model: str = "default"
    executor_url: str | None = None
    executor_params: int | None = None
    executor_chat_template: str | None = None
    feature_backend: BackendKind | None = None
    feature_model: str | None = None
    feature_url: str | None = None
    feature_params: int | None = None

    # Local (llama.cpp) engine
    local_threads: int = Field(default=0, ge=0)  # 0: one per core
    local_max_batch: int = Field(default=16, ge=1, le=256)
    local_context: int = Field(default=4096, ge=512)  # per sequence
    # auto: Q4_1/Q5_1 files run as a cached Q8_0 copy (batches 1.5x+ faster, near-lossless)
    local_weights: Literal["auto", "q8_0", "as-is"] = "auto"
    model_cache: str | None = None  # where such copies live; default ~/.cache/tandem/models

    # HTTP (SGLang / OpenAI-compatible) engine
    http_timeout_s: float = Field(default=300.0, gt=0)
    http_connect_timeout_s: float = Field(default=5.0, gt=0)
    http_retries: int = Field(default=3, ge=0, le=10)
    # Vocabulary size for entropy estimates from top-k logprobs (SGLang does not report it).
    http_vocab_size: int | None = Field(default=None, ge=2)
    # The Hugging Face cache the model servers download into (shared with the SGLang
    # sidecar): where a served model's chat template is looked up. The hub's own variables.
    hf_hub_cache: str | None = Field(
        default=None, validation_alias=AliasChoices("hf_hub_cache", "HF_HUB_CACHE")
    )
    hf_home: str | None = Field(default=None, validation_alias=AliasChoices("hf_home", "HF_HOME"))

    # Sufficiency classifier: a trained artifact, or the training-free default policy
    classifier_artifact: str | None = None

    # Jobs
    max_question_chars: int = Field(default=8000, ge=1)
    max_stage_attempts: int = Field(default=5, ge=1)
    stage_deadline_s: float = Field(default=120.0, gt=0)  # no heartbeat this long: re-enqueue
    visibility_timeout_s: int = Field(default=3600, ge=60)  # Redis redelivers unacked after this

    # Evaluation reports shown on the dashboard (the --out folder of `tandem eval`)
    eval_dir: str | None = None

    # Observability
    log_level: str = "INFO"
    log_json: bool = True
    metrics_port: int = Field(default=0, ge=0, le=65535)  # workers' /metrics; 0: off
    # prometheus_client's multiprocess directory; `tandem api` sets a fresh one itself.
    prometheus_multiproc_dir: str | None = Field(
        default=None,
        validation_alias=AliasChoices("prometheus_multiproc_dir", "PROMETHEUS_MULTIPROC_DIR"),
    )

    # API
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    api_workers: int = Field(default=2, ge=1)
    api_threads: int = Field(default=16, ge=1)
    max_body_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    max_queue_depth: int = Field(default=100_000, ge=1)  # backpressure: 429 above this
    rate_limit_per_minute: int = Field(default=6000, ge=0)  # per key; 0: off
    max_active_jobs: int = Field(default=10_000, ge=0)  # unfinished single jobs per key; 0: off

    def model(self, role: Role) -> ModelSettings:
        if role == "feature":
            executor = self.model("executor")
            model = self.feature_model or executor.model
            return ModelSettings(
                role="feature",
                backend=self.feature_backend or executor.backend,
                model=model,
                url=self.feature_url or executor.url,
                # SGLang does not report parameter counts: the executor's, when it is its model
                n_params=self.feature_params
                or (executor.n_params if model == executor.model else None),
                chat_template=executor.chat_template,
            )
        return ModelSettings(
            role=role,
            backend=getattr(self, f"{role}_backend"),
            model=getattr(self, f"{role}_model"),
            url=getattr(self, f"{role}_url"),
            n_params=getattr(self, f"{role}_params"),
            chat_template=getattr(self, f"{role}_chat_template"),
        )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
