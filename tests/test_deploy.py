"""The deployment's promises, checked on the rendered manifests (no cluster needed).

Every overlay under k8s/overlays/ is rendered with `kubectl kustomize`; the tests then read the
objects the cluster would receive. Skipped only when no kubectl can be found (on this
project's machines it is preinstalled, and scripts/deploy_check.sh installs one otherwise).
Schema validation needs kubernetes-validate, which scripts/deploy_check.sh installs; those
tests skip without it and the script, run by .ci/run, does the same validation.
"""

from __future__ import annotations

import base64
import functools
import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
OVERLAY_DIR = K8S / "overlays"
COMPOSE_FILE = ROOT / "docker-compose.yml"

QUEUES = ("coordinator", "classifier", "executor")
MODEL_ROLES = ("coordinator", "executor")  # pods that carry an SGLang sidecar
GPU_OVERLAYS = ("gpu", "gpu-incluster-db")
REQUIRED_OVERLAYS = {"cpu", *GPU_OVERLAYS}
POOL_LABEL = "tandem.dev/pool"
POOL_KEY = {"coordinator": "POOL_COORDINATOR", "executor": "POOL_EXECUTOR"}
# The classifier shares the executor's (small-GPU) pool.
POOL_OF_QUEUE = {"coordinator": "coordinator", "classifier": "executor", "executor": "executor"}
MIGRATE_COMMAND = ["tandem", "db", "upgrade"]
PLACEHOLDER_MARKERS = ("change-me", "dev-only", "example")

OVERLAYS = (
    sorted(p.name for p in OVERLAY_DIR.iterdir() if (p / "kustomization.yaml").is_file())
    if OVERLAY_DIR.is_dir()
    else []
)


def _tools_bin() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return Path(os.environ.get("TANDEM_TOOLS_DIR", default / "tandem-deploy-tools")) / "bin"


def _kubectl() -> str | None:
    return shutil.which("kubectl") or shutil.which("kubectl", path=str(_tools_bin()))


@functools.cache
def _render(overlay: str) -> tuple[dict[str, Any], ...]:
    kubectl = _kubectl()
    if kubectl is None:
        pytest.skip("kubectl not found (scripts/deploy_check.sh installs it)")
    proc = subprocess.run(
        [kubectl, "kustomize", str(OVERLAY_DIR / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"kustomize failed for {overlay}:\n{proc.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)


# --- helpers ----------------------------------------------------------------------------


def _objects(docs, kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") == kind]


def _named(docs, kind: str, name: str) -> dict[str, Any]:
    found = [d for d in _objects(docs, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def _config(docs) -> dict[str, str]:
    maps = [
        d for d in _objects(docs, "ConfigMap") if d["metadata"]["name"].startswith("tandem-config")
    ]
    assert len(maps) == 1, "expected exactly one tandem-config ConfigMap"
    return maps[0]["data"]


def _pod(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def _sidecars(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in pod.get("initContainers", []) if c.get("restartPolicy") == "Always"]


def _long_running(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return list(pod["containers"]) + _sidecars(pod)


def _container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    for c in list(pod["containers"]) + list(pod.get("initContainers", [])):
        if c["name"] == name:
            return c
    raise AssertionError(f"no container {name}")


def _argv(container: dict[str, Any]) -> list[str]:
    """Command + args with $(VAR) expanded from the container's literal env values."""
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    words = list(container.get("command", [])) + list(container.get("args", []))
    return [
        re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), str(w)) for w in words
    ]


def _env_value(container: dict[str, Any], name: str) -> str | None:
    for e in container.get("env", []):
        if e["name"] == name:
            return e.get("value")
    return None


def _option(argv: list[str], flag: str) -> str:
    assert flag in argv, f"{flag} missing from {argv}"
    return argv[argv.index(flag) + 1]


def _worker_deployments(docs) -> dict[str, dict[str, Any]]:
    """queue -> the Deployment whose worker consumes it (fails on duplicates)."""
    out: dict[str, dict[str, Any]] = {}
    for dep in _objects(docs, "Deployment"):
        for c in _pod(dep)["containers"]:
            argv = _argv(c)
            if argv[:4] == ["celery", "-A", "workers", "worker"]:
                queue = _option(argv, "-Q")
                assert queue not in out, f"two Deployments consume queue {queue}"
                out[queue] = dep
    return out


def _gpu_limit(pod: dict[str, Any]) -> int:
    return sum(
        int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
        for c in list(pod["containers"]) + list(pod.get("initContainers", []))
    )


def _probe_budget_s(probe: dict[str, Any]) -> int:
    return probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)


def _load_validator():
    pytest.importorskip(
        "kubernetes_validate",
        reason="kubernetes-validate not installed "
        "(scripts/deploy_check.sh installs it and validates too)",
    )
    pytest.importorskip("jsonschema")
    spec = importlib.util.spec_from_file_location(
        "validate_manifests", K8S / "tools" / "validate_manifests.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- layout -----------------------------------------------------------------------------


def test_required_overlays_exist():
    assert set(OVERLAYS) >= REQUIRED_OVERLAYS, f"overlays: {OVERLAYS}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_everything_lands_in_one_namespace(overlay):
    docs = _render(overlay)
    stray = [
        f"{d['kind']}/{d['metadata']['name']}"
        for d in docs
        if d["kind"] != "Namespace" and d["metadata"].get("namespace") != "tandem"
    ]
    assert not stray, f"objects without namespace tandem: {stray}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_one_worker_deployment_per_queue(overlay):
    docs = _render(overlay)
    workers = _worker_deployments(docs)
    assert set(workers) == set(QUEUES)
    for queue, dep in workers.items():
        worker = _container(_pod(dep), "worker")
        argv = _argv(worker)
        assert _option(argv, "-n").startswith(f"{queue}@")
        assert _option(argv, "--pool") == "threads"
        assert _option(argv, "--prefetch-multiplier") == "1"
        assert int(_option(argv, "--concurrency")) >= 1
    api = _container(_pod(_named(docs, "Deployment", "tandem-api")), "api")
    assert _argv(api) == ["tandem", "api"]
    reconciler = _pod(_named(docs, "Deployment", "tandem-reconciler"))
    assert _argv(_container(reconciler, "reconciler")) == ["tandem", "reconcile"]
    assert _named(docs, "Deployment", "tandem-reconciler")["spec"]["replicas"] == 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_api_is_exposed(overlay):
    docs = _render(overlay)
    api = _named(docs, "Deployment", "tandem-api")
    labels = api["spec"]["template"]["metadata"]["labels"]
    svc = _named(docs, "Service", "tandem-api")
    assert svc["spec"]["selector"].items() <= labels.items()
    port = svc["spec"]["ports"][0]
    assert port["targetPort"] in ("http", 8000)
    ports = _container(_pod(api), "api")["ports"]
    assert {"name": "http", "containerPort": 8000} in ports
    assert _config(docs)["TANDEM_API_HOST"] == "0.0.0.0"
    ingress = _named(docs, "Ingress", "tandem-api")
    backends = [
        p["backend"]["service"]["name"]
        for rule in ingress["spec"]["rules"]
        for p in rule["http"]["paths"]
    ]
    assert backends == ["tandem-api"]


# --- GPU pools ----------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", GPU_OVERLAYS)
@pytest.mark.parametrize("queue", QUEUES)
def test_model_pods_request_gpus_on_their_pool(overlay, queue):
    docs = _render(overlay)
    config = _config(docs)
    pod = _pod(_worker_deployments(docs)[queue])
    assert _gpu_limit(pod) >= 1, f"{queue} pod requests no nvidia.com/gpu"
    pool = config[POOL_KEY[POOL_OF_QUEUE[queue]]]
    assert pod.get("nodeSelector", {}).get(POOL_LABEL) == pool
    tolerated = [
        t
        for t in pod.get("tolerations", [])
        if t.get("key") == POOL_LABEL
        and t.get("effect") == "NoSchedule"
        and (t.get("operator") == "Exists" or t.get("value") == pool)
    ]
    assert tolerated, f"{queue} pod does not tolerate the taint of pool {pool}"
    # GPU pools have no spare GPU for a surge pod.
    assert _worker_deployments(docs)[queue]["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0


@pytest.mark.parametrize("overlay", GPU_OVERLAYS)
@pytest.mark.parametrize("role", MODEL_ROLES)
def test_model_pods_carry_their_sglang_server(overlay, role):
    docs = _render(overlay)
    config = _config(docs)
    dep = _worker_deployments(docs)[role]
    pod = _pod(dep)
    sidecars = [c for c in _sidecars(pod) if c["name"] == "sglang"]
    assert len(sidecars) == 1, "SGLang must run as a native sidecar (restartPolicy: Always)"
    sglang = sidecars[0]
    argv = sglang["command"] + sglang["args"]
    assert "sglang.launch_server" in argv
    assert _option(argv, "--port") == "30000"
    assert "--enable-metrics" in argv
    # The served model and TP size come from the values in tandem-config ...
    env = {e["name"]: e.get("valueFrom", {}).get("configMapKeyRef", {}) for e in sglang["env"]}
    model_var = _option(argv, "--model-path").strip("$()")
    assert env[model_var]["key"] == f"TANDEM_{role.upper()}_MODEL"
    assert env[model_var]["name"] == next(
        d["metadata"]["name"]
        for d in _objects(docs, "ConfigMap")
        if d["metadata"]["name"].startswith("tandem-config")
    )
    tp_var = _option(argv, "--tp-size").strip("$()")
    assert env[tp_var]["key"] == f"SGLANG_{role.upper()}_TP"
    # ... and the GPUs requested match the TP size: one GPU per rank.
    assert _gpu_limit(pod) == int(config[f"SGLANG_{role.upper()}_TP"])
    assert config[f"TANDEM_{role.upper()}_BACKEND"] == "sglang"
    # Weight loading: the startup probe on /health allows at least 10 minutes.
    startup = sglang["startupProbe"]
    assert startup["httpGet"]["path"] == "/health"
    assert _probe_budget_s(startup) >= 600
    assert sglang["readinessProbe"]["httpGet"]["path"] == "/health"
    # Shared memory for NCCL / tensor parallel.
    volumes = {v["name"]: v for v in pod["volumes"]}
    shm = [m for m in sglang["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert shm and volumes[shm[0]["name"]]["emptyDir"]["medium"] == "Memory"
    # The worker talks to its own sidecar, with enough requests in flight to batch.
    worker = _container(pod, "worker")
    assert _env_value(worker, f"TANDEM_{role.upper()}_URL") == "http://127.0.0.1:30000"
    assert int(_option(_argv(worker), "--concurrency")) >= 16


@pytest.mark.parametrize("overlay", GPU_OVERLAYS)
def test_model_servers_reachable_through_services(overlay):
    docs = _render(overlay)
    config = _config(docs)
    services = {s["metadata"]["name"]: s for s in _objects(docs, "Service")}
    for key in ("TANDEM_COORDINATOR_URL", "TANDEM_EXECUTOR_URL", "TANDEM_FEATURE_URL"):
        url = urlsplit(config[key])
        assert url.hostname in services, f"{key} points at unknown Service {url.hostname}"
        assert url.port in [p["port"] for p in services[url.hostname]["spec"]["ports"]]


def test_cpu_overlay_needs_no_gpu():
    docs = _render("cpu")
    config = _config(docs)
    for dep in _objects(docs, "Deployment") + _objects(docs, "StatefulSet"):
        pod = _pod(dep)
        assert _gpu_limit(pod) == 0, dep["metadata"]["name"]
        assert POOL_LABEL not in pod.get("nodeSelector", {})
    assert config["TANDEM_COORDINATOR_BACKEND"] == "local"
    assert config["TANDEM_EXECUTOR_BACKEND"] == "local"


# --- autoscaling --------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("queue", QUEUES)
def test_each_queue_scales_on_its_redis_list(overlay, queue):
    docs = _render(overlay)
    target = _worker_deployments(docs)[queue]["metadata"]["name"]
    scaled = [
        s for s in _objects(docs, "ScaledObject") if s["spec"]["scaleTargetRef"]["name"] == target
    ]
    assert len(scaled) == 1, f"expected one ScaledObject for {target}"
    spec = scaled[0]["spec"]
    assert spec["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    assert spec["cooldownPeriod"] > 0
    redis = [t for t in spec["triggers"] if t["type"] == "redis"]
    assert len(redis) == 1
    assert redis[0]["metadata"]["listName"] == queue
    assert int(redis[0]["metadata"]["listLength"]) >= 1
    auth = _named(docs, "TriggerAuthentication", redis[0]["authenticationRef"]["name"])
    params = {ref["parameter"] for ref in auth["spec"]["secretTargetRef"]}
    assert {"address", "password"} <= params
    # KEDA owns the replica count: a replicas field would fight it on every apply.
    assert "replicas" not in _worker_deployments(docs)[queue]["spec"]


# --- probes, migration, disruption, shutdown ---------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_long_running_container_has_probes(overlay):
    docs = _render(overlay)
    missing = []
    for workload in _objects(docs, "Deployment") + _objects(docs, "StatefulSet"):
        for c in _long_running(_pod(workload)):
            for probe in ("livenessProbe", "readinessProbe"):
                if probe not in c:
                    missing.append(f"{workload['metadata']['name']}/{c['name']}: {probe}")
    assert not missing, missing
    api = _container(_pod(_named(docs, "Deployment", "tandem-api")), "api")
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for queue, dep in _worker_deployments(docs).items():
        probe = " ".join(_container(_pod(dep), "worker")["livenessProbe"]["exec"]["command"])
        assert "inspect ping" in probe and f"{queue}@" in probe, probe


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_migration_runs_before_any_tandem_pod(overlay):
    docs = _render(overlay)
    jobs = [
        j
        for j in _objects(docs, "Job")
        if any(_argv(c) == MIGRATE_COMMAND for c in _pod(j)["containers"])
    ]
    assert len(jobs) == 1, "expected one migration Job running `tandem db upgrade`"
    tandem_deployments = [
        d
        for d in _objects(docs, "Deployment")
        if any(_argv(c)[:1] in (["tandem"], ["celery"]) for c in _pod(d)["containers"])
    ]
    assert len(tandem_deployments) == 2 + len(QUEUES)  # api, reconciler, one per queue
    for dep in tandem_deployments:
        inits = _pod(dep).get("initContainers", [])
        assert inits, f"{dep['metadata']['name']} has no initContainers"
        first = inits[0]
        assert _argv(first) == MIGRATE_COMMAND, f"{dep['metadata']['name']}: {first['name']}"
        assert first.get("restartPolicy") != "Always"  # must run to completion first
        main_db = [
            e["valueFrom"]["secretKeyRef"]
            for c in _pod(dep)["containers"]
            for e in c["env"]
            if e["name"] == "TANDEM_DATABASE_URL"
        ]
        init_db = [
            e["valueFrom"]["secretKeyRef"]
            for e in first["env"]
            if e["name"] == "TANDEM_DATABASE_URL"
        ]
        assert init_db and main_db and init_db[0] == main_db[0]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_first_upgrade_phase_holds_what_the_migration_job_needs(overlay):
    """docs/deploy.md applies `-l app.kubernetes.io/component in (config,migrate)` first."""
    docs = _render(overlay)
    phase1 = {
        (d["kind"], d["metadata"]["name"])
        for d in docs
        if d["metadata"].get("labels", {}).get("app.kubernetes.io/component")
        in ("config", "migrate")
    }
    job = next(j for j in _objects(docs, "Job") if j["metadata"]["name"] == "tandem-migrate")
    pod = _pod(job)
    needed = {("Namespace", "tandem"), ("ServiceAccount", pod["serviceAccountName"])}
    needed |= {
        ("ConfigMap", src["configMapRef"]["name"])
        for c in pod["containers"]
        for src in c.get("envFrom", [])
    }
    needed |= {("Secret", name) for name, _ in _secret_refs([job]) if _objects(docs, "Secret")}
    assert needed <= phase1, needed - phase1
    # Only the Job and configuration: no workload starts in phase 1.
    assert not {k for k, _ in phase1} & {"Deployment", "StatefulSet"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_disruption_budgets_cover_api_and_every_queue(overlay):
    docs = _render(overlay)
    pdbs = _objects(docs, "PodDisruptionBudget")
    deployments = [_named(docs, "Deployment", "tandem-api"), *_worker_deployments(docs).values()]
    for dep in deployments:
        labels = dep["spec"]["template"]["metadata"]["labels"]
        matching = [
            p for p in pdbs if p["spec"]["selector"]["matchLabels"].items() <= labels.items()
        ]
        assert len(matching) == 1, f"{dep['metadata']['name']}: {len(matching)} PDBs"
        spec = matching[0]["spec"]
        # A budget that can never be met blocks node drains forever.
        if "minAvailable" in spec:
            assert dep["spec"].get("replicas", 1) > spec["minAvailable"]
        else:
            assert spec["maxUnavailable"] >= 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_period_outlasts_a_stage_and_undercuts_redelivery(overlay, monkeypatch):
    docs = _render(overlay)
    config = _config(docs)
    deadline = float(config["TANDEM_STAGE_DEADLINE_S"])
    http_timeout = float(config["TANDEM_HTTP_TIMEOUT_S"])
    # The visibility timeout the workers compute from this very configuration.
    monkeypatch.setenv("TANDEM_STAGE_DEADLINE_S", config["TANDEM_STAGE_DEADLINE_S"])
    from services.settings import get_settings

    get_settings.cache_clear()
    try:
        from workers.app import make_app

        visibility = make_app().conf.broker_transport_options["visibility_timeout"]
    finally:
        get_settings.cache_clear()
    for queue, dep in _worker_deployments(docs).items():
        grace = _pod(dep)["terminationGracePeriodSeconds"]
        assert grace >= deadline, f"{queue}: grace {grace} < stage deadline {deadline}"
        assert grace >= http_timeout
        # Otherwise Redis hands a stage that is still finishing to a second worker.
        assert grace < visibility, f"{queue}: grace {grace} >= visibility_timeout {visibility}"


# --- secrets and references -----------------------------------------------------------------

REAL_TOKEN_PATTERNS = (
    re.compile(r"hf_[A-Za-z0-9]{30,}"),
    re.compile(r"AKIA[0-9A-Z]{16}"),
    re.compile(r"sk-[A-Za-z0-9_-]{20,}"),
    re.compile(r"gh[pousr]_[A-Za-z0-9]{30,}"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
)
SECRET_KEY_NAMES = re.compile(r"PASSWORD|TOKEN|SECRET|API_?KEY|URL", re.IGNORECASE)


def _looks_real(key: str, value: str) -> bool:
    """True when a secret value is not an obvious placeholder."""
    if any(p.search(value) for p in REAL_TOKEN_PATTERNS):
        return True
    if any(marker in value.lower() for marker in PLACEHOLDER_MARKERS) or not value:
        return False
    if "://" in value:
        return bool(urlsplit(value).password)
    return bool(SECRET_KEY_NAMES.search(key))


def test_placeholder_detector_flags_real_looking_values():
    assert _looks_real("REDIS_PASSWORD", "s3cr3t-Pa55")
    assert _looks_real("TANDEM_DATABASE_URL", "postgresql+psycopg://u:hunter2@db:5432/x")
    assert _looks_real("HF_TOKEN", "hf_" + "a1B2" * 9)
    assert not _looks_real("REDIS_PASSWORD", "dev-only-change-me")
    assert not _looks_real("TANDEM_REDIS_URL", "redis://redis:6379/0")
    assert not _looks_real("REDIS_ADDRESS", "tandem-redis.tandem.svc.cluster.local:6379")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_secret_carries_a_real_looking_value(overlay):
    docs = _render(overlay)
    for secret in _objects(docs, "Secret"):
        values = {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
        values.update(secret.get("stringData", {}))
        for key, value in values.items():
            assert not _looks_real(key, value), f"{secret['metadata']['name']}.{key}"


def test_production_overlay_ships_no_secret():
    assert not _objects(_render("gpu"), "Secret"), (
        "gpu overlay must take tandem-secrets from outside git"
    )


def _secret_refs(docs) -> set[tuple[str, str]]:
    refs = set()
    for workload in (
        _objects(docs, "Deployment") + _objects(docs, "StatefulSet") + _objects(docs, "Job")
    ):
        pod = _pod(workload)
        for c in list(pod["containers"]) + list(pod.get("initContainers", [])):
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref and not ref.get("optional"):
                    refs.add((ref["name"], ref["key"]))
    for auth in _objects(docs, "TriggerAuthentication"):
        refs |= {(r["name"], r["key"]) for r in auth["spec"].get("secretTargetRef", [])}
    return refs


def _example_secret_keys() -> set[str]:
    keys = set()
    for line in (K8S / "secrets.env.example").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keys.add(line.split("=", 1)[0])
    return keys


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_secret_and_config_reference_resolves(overlay):
    docs = _render(overlay)
    rendered = {s["metadata"]["name"]: set(s.get("data", {})) for s in _objects(docs, "Secret")}
    for name, key in _secret_refs(docs):
        if rendered:
            assert key in rendered.get(name, set()), f"secret {name} lacks {key}"
        else:  # created from k8s/secrets.env.example by the operator
            assert name == "tandem-secrets" and key in _example_secret_keys(), key
    config_name = next(
        d["metadata"]["name"]
        for d in _objects(docs, "ConfigMap")
        if d["metadata"]["name"].startswith("tandem-config")
    )
    config = _config(docs)
    for workload in _objects(docs, "Deployment") + _objects(docs, "Job"):
        pod = _pod(workload)
        for c in list(pod["containers"]) + list(pod.get("initContainers", [])):
            for src in c.get("envFrom", []):
                assert src["configMapRef"]["name"] == config_name
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("configMapKeyRef")
                if ref:
                    assert ref["name"] == config_name and ref["key"] in config, ref


def test_committed_deploy_files_hold_no_real_secrets():
    files = [COMPOSE_FILE, *K8S.rglob("*.yaml"), *K8S.rglob("*.example")]
    assert len(files) > 10
    for path in files:
        text = path.read_text()
        for pattern in REAL_TOKEN_PATTERNS:
            assert not pattern.search(text), f"{path}: {pattern.pattern}"
        for url in re.findall(r"[a-z+]+://[^\s\"']+", text):
            assert not _looks_real("URL", url), f"{path}: {url}"


# --- schema validation ------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_manifests_validate_offline(overlay, tmp_path):
    validator = _load_validator()
    path = tmp_path / f"{overlay}.yaml"
    path.write_text(yaml.safe_dump_all(_render(overlay)))
    assert validator.validate_file(path, validator.DEFAULT_KUBERNETES_VERSION) == []


def test_validators_reject_broken_objects():
    validator = _load_validator()
    docs = _render("gpu")
    version = validator.DEFAULT_KUBERNETES_VERSION
    scaled = _named(docs, "ScaledObject", "tandem-executor")
    assert validator.validate_document(scaled, version) == []
    broken = yaml.safe_load(yaml.safe_dump(scaled))
    del broken["spec"]["triggers"][0]["metadata"]["listName"]
    assert validator.validate_document(broken, version)
    broken = yaml.safe_load(yaml.safe_dump(scaled))
    broken["spec"]["maxReplicas"] = 3  # not a KEDA field
    assert validator.validate_document(broken, version)
    dep = yaml.safe_load(yaml.safe_dump(_named(docs, "Deployment", "tandem-api")))
    dep["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    assert validator.validate_document(dep, version)
    missing_target = yaml.safe_load(yaml.safe_dump(scaled))
    missing_target["spec"]["scaleTargetRef"]["name"] = "nope"
    assert validator.cross_reference([missing_target])


# --- docker compose -----------------------------------------------------------------------


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    return command.split() if isinstance(command, str) else list(command)


def test_compose_services_and_startup_order():
    services = _compose()["services"]
    for name in ("postgres", "redis", "migrate", "api", "reconciler"):
        assert name in services and "profiles" not in services[name], name
    assert _command(services["migrate"]) == MIGRATE_COMMAND
    assert _command(services["api"]) == ["tandem", "api"]
    assert _command(services["reconciler"]) == ["tandem", "reconcile"]
    assert any(str(p).endswith("8000:8000") for p in services["api"]["ports"])
    for name in ("api", "reconciler"):
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully"
        assert deps["postgres"]["condition"] == "service_healthy"
        assert deps["redis"]["condition"] == "service_healthy"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_compose_profile_has_one_worker_per_queue(profile):
    services = _compose()["services"]
    consumers: dict[str, str] = {}
    for name, svc in services.items():
        argv = _command(svc)
        if profile in svc.get("profiles", []) and argv[:4] == ["celery", "-A", "workers", "worker"]:
            queue = _option(argv, "-Q")
            assert queue not in consumers, f"{queue} consumed twice in profile {profile}"
            consumers[queue] = name
            assert _option(argv, "--pool") == "threads"
            assert svc["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert set(consumers) == set(QUEUES)
    if profile == "cpu":
        return
    for role in MODEL_ROLES:
        server = services[f"sglang-{role}"]
        argv = _command(server)
        assert "sglang.launch_server" in argv and "--enable-metrics" in argv
        assert _option(argv, "--port") == "30000"
        devices = server["deploy"]["resources"]["reservations"]["devices"]
        assert devices and "gpu" in devices[0]["capabilities"]
        worker = services[consumers[role]]
        env = worker["environment"]
        assert env[f"TANDEM_{role.upper()}_BACKEND"] == "sglang"
        assert env[f"TANDEM_{role.upper()}_URL"] == f"http://sglang-{role}:30000"
        assert worker["depends_on"][f"sglang-{role}"]["condition"] == "service_healthy"
        assert int(_option(_command(worker), "--concurrency")) >= 16


def _compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run(
            [docker, "compose", "version"], capture_output=True, check=False
        ).returncode
        == 0
    ):
        return [docker, "compose"]
    standalone = shutil.which(
        "docker-compose", path=f"{_tools_bin()}{os.pathsep}{os.environ.get('PATH', '')}"
    )
    return [standalone] if standalone else None


@pytest.mark.parametrize("profile", [None, "cpu", "gpu"])
def test_compose_file_validates(profile):
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no docker compose CLI (scripts/deploy_check.sh installs one)")
    args = [*cli, "-f", str(COMPOSE_FILE)]
    if profile:
        args += ["--profile", profile]
    proc = subprocess.run(
        [*args, "config", "-q"], capture_output=True, text=True, check=False, timeout=120
    )
    assert proc.returncode == 0, proc.stderr


# --- images -----------------------------------------------------------------------------


def test_images_are_built_as_documented():
    cpu = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM \$\{PYTHON_IMAGE\} AS builder", cpu, re.M)
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in cpu
    assert "build-essential" in cpu and "cmake" in cpu
    assert re.search(r"^COPY --from=builder /opt/venv", cpu, re.M), (
        "runtime must be a separate stage"
    )
    gpu = (ROOT / "Dockerfile.gpu").read_text()
    tag = re.search(r"^ARG SGLANG_IMAGE=(lmsysorg/sglang:v[0-9][\w.-]+)$", gpu, re.M)
    assert tag, "Dockerfile.gpu must pin a concrete lmsysorg/sglang tag"
    assert tag.group(1) in (ROOT / "docs" / "deploy.md").read_text(), "document the SGLang tag"
