"""One typed settings object, read from TANDEM_* environment variables.

Every variable is documented in README.md ("Configuration"). Nothing else in the code
reads the environment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# local: llama.cpp in this process; sglang: a server speaking the OpenAI-compatible
# completions protocol (SGLang in production; llama.cpp's and vLLM's servers work too),
# served by `OpenAIHTTPBackend`; torch: transformers, the classifier's feature model only.
BackendKind = Literal["local", "sglang", "torch"]
Role = Literal["coordinator", "executor", "classifier"]  # as in steps.Role

# The prefix of each role's variables. The classifier's model is configured by
# TANDEM_FEATURE_*: "feature model" is the paper's name for the model that computes the
# classifier's features, and deployments already set these names. This table is the only
# place where a role and its variables are named differently.
ENV_PREFIX: dict[str, str] = {
    "coordinator": "TANDEM_COORDINATOR",
    "executor": "TANDEM_EXECUTOR",
    "classifier": "TANDEM_FEATURE",
}


@dataclass(frozen=True)
class ModelSettings:
    """Where one role's model lives."""

    role: str  # coordinator, executor or classifier
    backend: BackendKind
    model: str  # "default" (the packaged SmolLM2 GGUF), a GGUF path, or a model id / HF path
    url: str | None  # base URL of the OpenAI-compatible server (backend "sglang")
    n_params: int | None  # parameter count override for the cost model
    # Where a served model's chat template comes from: a tokenizer_config.json, a .jinja
    # file, a model directory, or None: found from the served model (template_source.py).
    chat_template: str | None = None
    # Bearer token for the model server (SGLang's --api-key); None: send none.
    api_key: str | None = field(default=None, repr=False)

    @property
    def env_prefix(self) -> str:
        """Where this role's settings come from, e.g. TANDEM_FEATURE for the classifier."""
        return ENV_PREFIX[self.role]

    @property
    def engine_key(self) -> tuple[str, str, str | None]:
        """Roles with the same key share one loaded engine."""
        return (self.backend, self.model, self.url)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TANDEM_", extra="ignore")

    # Storage and broker
    database_url: str = "sqlite:///tandem.db"
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Connections of one process (SQLAlchemy pool): at most db_pool_size + db_max_overflow.
    db_pool_size: int = Field(default=10, ge=1)
    db_max_overflow: int = Field(default=40, ge=0)
    # What sits between the processes and Postgres. "pgbouncer": PgBouncer in transaction
    # pooling mode, where consecutive transactions of one client may run on different server
    # connections, so no server-side prepared statements are used.
    db_pooler: Literal["none", "pgbouncer"] = "none"

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
    # Sent as `Authorization: Bearer ...` to every model server (SGLang --api-key).
    model_api_key: SecretStr | None = None

    # Workers: stages one worker process runs at once (its thread pool). With a model server
    # behind it, size it to the server's batch capacity (SGLang --max-running-requests).
    worker_concurrency: int = Field(default=16, ge=1, le=4096)
    feature_params: int | None = None

    # Local (llama.cpp) engine
    local_threads: int = Field(default=0, ge=0)  # 0: one per core
    local_max_batch: int = Field(default=16, ge=1, le=256)
    local_context: int = Field(default=4096, ge=512)  # per sequence
    # most tokens per engine step while an interactive request runs (1: batch sequences wait);
    # default and bound are local.py's INTERACTIVE_STEP_TOKENS and EXACT_STEP_TOKENS
    local_interactive_step_tokens: int = Field(default=1, ge=1, le=63)
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
    # A stage running longer than this fails its attempt (its generation is aborted): below
    # the deployment's termination grace, and below the visibility timeout.
    stage_timeout_s: float = Field(default=600.0, gt=0)
    visibility_timeout_s: int = Field(default=3600, ge=60)  # Redis redelivers unacked after this

    # Code grading sandbox (services/grading; docs/grading.md). Memory and file size per process.
    grader_timeout_s: float = Field(default=10.0, gt=0, le=3600)  # wall clock per item
    grader_memory_mb: int = Field(default=512, ge=32)  # address space (RLIMIT_AS)
    grader_max_processes: int = Field(default=16, ge=2)  # processes + threads per sandbox
    grader_file_size_mb: int = Field(default=16, ge=1)  # largest file a program may write
    grader_workers: int = Field(default=0, ge=0)  # sandboxes at once; 0: one per core
    grader_python: str | None = None  # interpreter inside the sandbox; default: found under /usr

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
    # Batch feeder: a role's batch lanes hold about this many messages per stage its workers
    # can run at once (their announced capacity), and at least feed_min_depth.
    feed_depth_factor: float = Field(default=2.0, gt=0, le=100)
    feed_min_depth: int = Field(default=16, ge=1)
    feed_interval_s: float = Field(default=0.5, gt=0)  # between feeder passes
    max_batch_lines_per_owner: int = Field(default=1_000_000, ge=0)  # unfinished; 0: off
    rate_limit_per_minute: int = Field(default=6000, ge=0)  # per key; 0: off
    max_active_jobs: int = Field(default=10_000, ge=0)  # unfinished single jobs per key; 0: off
    # API keys: how long a process trusts what it looked up (a revoked key is refused within
    # this; last_used_at is written at most once per key per process in this time), and how
    # many unknown keys one client address may try per minute before it is turned away
    # without a database lookup (0: no limit).
    key_cache_ttl_s: float = Field(default=30.0, gt=0, le=3600)
    invalid_keys_per_minute: int = Field(default=60, ge=0)
    # Absolute base of the URLs in webhook payloads (e.g. https://api.example.com); unset:
    # the payload's `url` is a path.
    public_url: str | None = None

    # Webhooks (docs/webhooks.md): one attempt's whole time (connect, send, answer), its
    # connect part, the backoff between attempts (doubling from webhook_backoff_s up to
    # webhook_backoff_max_s, with jitter), and how long a delivery is retried before it fails.
    webhook_timeout_s: float = Field(default=10.0, gt=0, le=300)
    webhook_connect_timeout_s: float = Field(default=3.0, gt=0, le=60)
    webhook_backoff_s: float = Field(default=5.0, gt=0)
    webhook_backoff_max_s: float = Field(default=10_800.0, gt=0)
    webhook_retry_for_s: float = Field(default=86_400.0, ge=0)
    # Outbound safety: receivers must be public addresses, unless these allow more.
    # allow_private: any private, loopback, link-local or CGNAT address (never the cloud
    # metadata ones); allowed_cidrs: comma-separated networks allowed whatever they are.
    webhook_allow_private: bool = False
    webhook_allowed_cidrs: str = ""

    # Retention (docs/operations.md): finished jobs and batches older than this many days are
    # deleted by the reconciler, their costs kept in per-owner counters; unset: kept forever.
    retention_days: float | None = Field(default=None, gt=0)

    @field_validator("webhook_allowed_cidrs")
    @classmethod
    def _cidrs(cls, value: str) -> str:
        import ipaddress

        for part in filter(None, (piece.strip() for piece in value.split(","))):
            try:
                ipaddress.ip_network(part, strict=False)
            except ValueError:
                raise ValueError(
                    f"TANDEM_WEBHOOK_ALLOWED_CIDRS: {part!r} is not a network (e.g. 10.0.0.0/8)"
                ) from None
        return value
    # OpenAI surface (docs/openai.md): how long POST /v1/chat/completions waits for its job
    # before answering 504 (the job goes on: poll /v1/jobs/{id}); the largest file
    # POST /v1/files takes (it streams into Postgres, so this may exceed max_body_bytes).
    openai_wait_s: float = Field(default=300.0, gt=0, le=3600)
    max_file_bytes: int = Field(default=512 * 1024 * 1024, ge=1024)

    @model_validator(mode="after")
    def _stage_timeout_below_redelivery(self) -> Settings:
        if self.stage_timeout_s >= self.visibility_timeout_s:
            raise ValueError(
                "TANDEM_STAGE_TIMEOUT_S must be below TANDEM_VISIBILITY_TIMEOUT_S, or Redis "
                "redelivers a stage that is still running"
            )
        return self

    def model(self, role: Role) -> ModelSettings:
        """The model a role runs on. The classifier's is the feature model (TANDEM_FEATURE_*,
        see ENV_PREFIX), by default the executor's; it has no parameter override."""
        if role == "classifier":
            executor = self.model("executor")
            model = self.feature_model or executor.model
            return ModelSettings(
                role="classifier",
                backend=self.feature_backend or executor.backend,
                model=model,
                url=self.feature_url or executor.url,
                # SGLang does not report parameter counts: the executor's, when it is its model
                n_params=self.feature_params
                or (executor.n_params if model == executor.model else None),
                chat_template=executor.chat_template,
                api_key=self._model_api_key(),
            )
        return ModelSettings(
            role=role,
            backend=getattr(self, f"{role}_backend"),
            model=getattr(self, f"{role}_model"),
            url=getattr(self, f"{role}_url"),
            n_params=getattr(self, f"{role}_params"),
            chat_template=getattr(self, f"{role}_chat_template"),
            api_key=self._model_api_key(),
        )

    def _model_api_key(self) -> str | None:
        return self.model_api_key.get_secret_value() if self.model_api_key else None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
