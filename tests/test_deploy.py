"""The deployment's promises, checked on the rendered manifests (no cluster needed).

Every overlay under k8s/overlays/ is rendered with `kubectl kustomize`; the tests then read the
objects the cluster would receive: ports, probes, GPUs and node pools, autoscaling on work in
flight, security contexts, network policies, the connection pooler, grace periods, secrets.
The overlays' values (k8s/overlays/*/values.yaml: node shapes, models, batch capacities) are
read too, to check that the pods fit the nodes they are sized for. A real PgBouncer (Debian's
`pgbouncer`) runs the shipped pgbouncer.ini in front of the test Postgres.

Skipped only when a tool is missing: kubectl, the docker compose CLI and pgbouncer
(scripts/install_test_deps.sh installs them; `make test` runs it), kubernetes-validate (a dev
extra).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import importlib.util
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
OVERLAY_DIR = K8S / "overlays"
COMPOSE_FILE = ROOT / "docker-compose.yml"
COMPOSE_GPU_FILE = ROOT / "docker-compose.gpu.yml"
PGBOUNCER_INI = K8S / "base" / "pgbouncer" / "pgbouncer.ini"

ROLES = ("coordinator", "classifier", "executor")  # stage queues, three lanes each
WORKER_QUEUES = (*ROLES, "webhooks")
MODEL_ROLES = ("coordinator", "executor")  # pods that carry an SGLang sidecar
GPU_OVERLAYS = ("gpu", "gpu-incluster-db")
REQUIRED_OVERLAYS = {"cpu", *GPU_OVERLAYS}
POOL_LABEL = "tandem.dev/pool"
MIGRATE_COMMAND = ["tandem", "db", "upgrade"]
PLACEHOLDER_MARKERS = ("change-me", "dev-only", "example")
METRICS_PORT = 9100
MAX_BODY_BYTES = 64 * 1024 * 1024  # services/settings.py's default, the API's limit
# Volume types the Pod Security Standard "restricted" allows.
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}

OVERLAYS = (
    sorted(p.name for p in OVERLAY_DIR.iterdir() if (p / "kustomization.yaml").is_file())
    if OVERLAY_DIR.is_dir()
    else []
)


def lanes(role: str) -> list[str]:
    """A role's Redis lists in the order its worker consumes them."""
    return [role, f"{role}.batch", f"{role}.batch-new"] if role in ROLES else [role]


def _tools_bin() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return Path(os.environ.get("TANDEM_TOOLS_DIR", default / "tandem-deploy-tools")) / "bin"


def _kubectl() -> str | None:
    return shutil.which("kubectl") or shutil.which("kubectl", path=str(_tools_bin()))


def _kustomize(directory: Path) -> tuple[dict[str, Any], ...]:
    kubectl = _kubectl()
    if kubectl is None:
        pytest.skip("kubectl not found: run scripts/install_test_deps.sh")
    proc = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"kustomize failed for {directory}:\n{proc.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)


@functools.cache
def _render(overlay: str) -> tuple[dict[str, Any], ...]:
    return _kustomize(OVERLAY_DIR / overlay)


@functools.cache
def _values(overlay: str) -> dict[str, str]:
    """The overlay's values.yaml (gpu-incluster-db builds on gpu's)."""
    directory = OVERLAY_DIR / ("gpu" if overlay == "gpu-incluster-db" else overlay)
    doc = yaml.safe_load((directory / "values.yaml").read_text())
    assert doc["metadata"]["annotations"]["config.kubernetes.io/local-config"] == "true"
    return doc["data"]


# --- helpers ----------------------------------------------------------------------------


def _objects(docs, kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") == kind]


def _named(docs, kind: str, name: str) -> dict[str, Any]:
    found = [d for d in _objects(docs, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def _config_map(docs, prefix: str) -> dict[str, Any]:
    maps = [d for d in _objects(docs, "ConfigMap") if d["metadata"]["name"].startswith(prefix)]
    assert len(maps) == 1, f"expected exactly one {prefix} ConfigMap"
    return maps[0]


def _config(docs) -> dict[str, str]:
    """tandem-config: the settings every tandem process reads."""
    return _config_map(docs, "tandem-config-")["data"]


def _workloads(docs) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") in ("Deployment", "StatefulSet", "Job")]


def _pod(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def _sidecars(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in pod.get("initContainers", []) if c.get("restartPolicy") == "Always"]


def _long_running(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return list(pod["containers"]) + _sidecars(pod)


def _all_containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return list(pod["containers"]) + list(pod.get("initContainers", []))


def _container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    for c in _all_containers(pod):
        if c["name"] == name:
            return c
    raise AssertionError(f"no container {name}")


def _env(container: dict[str, Any], docs=()) -> dict[str, str]:
    """The container's literal environment: its ConfigMaps (envFrom), then its own values,
    with $(VAR) references expanded as the kubelet does."""
    env: dict[str, str] = {}
    for src in container.get("envFrom", []):
        name = src.get("configMapRef", {}).get("name")
        env.update(next((d["data"] for d in _objects(docs, "ConfigMap") if d["metadata"]["name"] == name), {}))
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), e["value"])
    return env


def _secret_env(container: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Variables set from Secrets: name -> (secret, key)."""
    return {
        e["name"]: (ref["name"], ref["key"])
        for e in container.get("env", [])
        if (ref := e.get("valueFrom", {}).get("secretKeyRef"))
    }


def _argv(container: dict[str, Any], docs=()) -> list[str]:
    """Command + args with $(VAR) expanded from the container's literal environment."""
    env = _env(container, docs)
    words = list(container.get("command", [])) + list(container.get("args", []))
    return [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), str(w)) for w in words]


def _option(argv: list[str], flag: str) -> str:
    assert flag in argv, f"{flag} missing from {argv}"
    return argv[argv.index(flag) + 1]


def _worker_deployments(docs) -> dict[str, dict[str, Any]]:
    """queue role -> the Deployment whose worker consumes it (fails on duplicates)."""
    out: dict[str, dict[str, Any]] = {}
    for dep in _objects(docs, "Deployment"):
        for c in _pod(dep)["containers"]:
            argv = _argv(c, docs)
            if argv[:4] == ["celery", "-A", "workers", "worker"]:
                role = _option(argv, "-Q").split(",")[0]
                assert role not in out, f"two Deployments consume queue {role}"
                out[role] = dep
    return out


def _gpu_limit(pod: dict[str, Any]) -> int:
    return sum(
        int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
        for c in _all_containers(pod)
    )


def _quantity(value: str | int | float) -> float:
    """A Kubernetes quantity as a number (CPUs, or bytes for memory)."""
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    assert match, value
    return float(match.group(1)) * units.get(match.group(2), 1)


def _pod_request(pod: dict[str, Any], resource: str) -> float:
    """What the scheduler reserves: app containers + sidecars, or the largest plain
    initContainer if that is more."""
    def req(c):
        return _quantity(c.get("resources", {}).get("requests", {}).get(resource, 0))

    running = sum(req(c) for c in _long_running(pod))
    inits = [req(c) for c in pod.get("initContainers", []) if c.get("restartPolicy") != "Always"]
    return max([running, *inits])


def _probe_budget_s(probe: dict[str, Any]) -> int:
    return probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if not selector:
        return True
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expr in selector.get("matchExpressions", []):
        present = expr["key"] in labels
        value = labels.get(expr["key"])
        if expr["operator"] == "In" and value not in expr["values"]:
            return False
        if expr["operator"] == "NotIn" and value in expr["values"]:
            return False
        if expr["operator"] == "Exists" and not present:
            return False
        if expr["operator"] == "DoesNotExist" and present:
            return False
    return True


def _pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"].get("labels", {})


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
    # The values objects are read by kustomize and never applied.
    assert not [d for d in docs if d["metadata"]["name"] == "tandem-values"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_one_worker_deployment_per_role_consuming_its_lanes_in_priority_order(overlay):
    docs = _render(overlay)
    workers = _worker_deployments(docs)
    assert set(workers) == set(WORKER_QUEUES)
    for role, dep in workers.items():
        worker = _container(_pod(dep), "worker")
        argv = _argv(worker, docs)
        assert _option(argv, "-Q").split(",") == lanes(role)
        assert _option(argv, "-n").startswith(f"{role}@")
        assert _option(argv, "--pool") == "threads"
        assert _option(argv, "--prefetch-multiplier") == "1"
        # The thread pool is the setting the worker reads (TANDEM_WORKER_CONCURRENCY).
        concurrency = _env(worker, docs)["TANDEM_WORKER_CONCURRENCY"]
        assert _option(argv, "--concurrency") == concurrency
        assert int(concurrency) == int(_values(overlay)[f"{role.upper()}_CONCURRENCY"])
    api = _container(_pod(_named(docs, "Deployment", "tandem-api")), "api")
    assert _argv(api) == ["tandem", "api"]
    reconciler = _pod(_named(docs, "Deployment", "tandem-reconciler"))
    assert _argv(_container(reconciler, "reconciler")) == ["tandem", "reconcile"]
    assert _named(docs, "Deployment", "tandem-reconciler")["spec"]["replicas"] == 1


def _ingress_routes(ingress: dict[str, Any], path: str) -> bool:
    for rule in ingress["spec"]["rules"]:
        for p in rule["http"]["paths"]:
            if p["pathType"] == "Exact" and p["path"] == path:
                return True
            prefix = p["path"].rstrip("/")
            if p["pathType"] in ("Prefix", "ImplementationSpecific") and (
                path == prefix or path.startswith(prefix + "/")
            ):
                return True
    return False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_api_is_exposed_over_tls_with_the_apis_body_limit(overlay):
    docs = _render(overlay)
    api = _named(docs, "Deployment", "tandem-api")
    svc = _named(docs, "Service", "tandem-api")
    assert svc["spec"]["selector"].items() <= _pod_labels(api).items()
    assert svc["spec"]["ports"][0]["targetPort"] == 8000
    container = _container(_pod(api), "api")
    assert {"name": "http", "containerPort": 8000} in container["ports"]
    env = _env(container, docs)
    assert env["TANDEM_API_HOST"] == "0.0.0.0"
    ingress = _named(docs, "Ingress", "tandem-api")
    values = _values(overlay)
    hosts = [rule["host"] for rule in ingress["spec"]["rules"]]
    assert hosts == [values["INGRESS_HOST"]]
    assert [h for tls in ingress["spec"]["tls"] for h in tls["hosts"]] == hosts
    assert all(tls["secretName"] for tls in ingress["spec"]["tls"])
    assert {
        p["backend"]["service"]["name"] for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]
    } == {"tandem-api"}
    # The controller's body limit is the API's own (64 MiB batch uploads; nginx's default
    # would be 1 MiB), from one value.
    body = ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"]
    assert int(body) == int(env["TANDEM_MAX_BODY_BYTES"]) == MAX_BODY_BYTES
    for path in ("/v1/jobs", "/v1/batches", "/dashboard", "/docs", "/openapi.json"):
        assert _ingress_routes(ingress, path), path


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_metrics_and_probes_are_not_public(overlay):
    ingress = _named(_render(overlay), "Ingress", "tandem-api")
    for path in ("/metrics", "/healthz", "/readyz", "/"):
        assert not _ingress_routes(ingress, path), f"the Ingress routes {path}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_and_probes_use_numeric_ports(overlay):
    """A named targetPort of a native sidecar resolves only from Kubernetes 1.32 on."""
    docs = _render(overlay)
    workloads = _workloads(docs)
    for svc in _objects(docs, "Service"):
        pods = [w for w in workloads if _selects({"matchLabels": svc["spec"]["selector"]}, _pod_labels(w))]
        assert pods, f"Service {svc['metadata']['name']} selects no pod"
        for port in svc["spec"]["ports"]:
            assert isinstance(port["targetPort"], int), svc["metadata"]["name"]
            exposed = {
                p["containerPort"] for w in pods for c in _long_running(_pod(w)) for p in c.get("ports", [])
            }
            assert port["targetPort"] in exposed, (svc["metadata"]["name"], port)
    for w in workloads:
        for c in _all_containers(_pod(w)):
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                spec = c.get(probe, {})
                for kind in ("httpGet", "tcpSocket"):
                    if kind in spec:
                        assert isinstance(spec[kind]["port"], int), (w["metadata"]["name"], c["name"])


# --- GPU pools ----------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", GPU_OVERLAYS)
@pytest.mark.parametrize("role", ROLES)
def test_model_pods_request_gpus_on_their_pool(overlay, role):
    docs = _render(overlay)
    values = _values(overlay)
    dep = _worker_deployments(docs)[role]
    pod = _pod(dep)
    assert _gpu_limit(pod) >= 1, f"{role} pod requests no nvidia.com/gpu"
    pool = values[f"{role.upper()}_POOL"]
    assert pod["nodeSelector"][POOL_LABEL] == pool
    tolerated = [
        t
        for t in pod.get("tolerations", [])
        if t.get("key") == POOL_LABEL and t.get("effect") == "NoSchedule" and t.get("value") == pool
    ]
    assert tolerated, f"{role} pod does not tolerate the taint of pool {pool}"
    # Capacity never drops during a rollout, even with one replica: one surge pod at a time
    # (the pool keeps room for it, see test_gpu_node_pools_hold_every_replica_plus_a_surge).
    rolling = dep["spec"]["strategy"]["rollingUpdate"]
    assert rolling == {"maxSurge": 1, "maxUnavailable": 0}
    assert dep["spec"]["progressDeadlineSeconds"] >= 1800
    # A node autoscaler must not evict a serving model pod to repack nodes.
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert annotations["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "false"


@pytest.mark.parametrize("overlay", GPU_OVERLAYS)
@pytest.mark.parametrize("role", MODEL_ROLES)
def test_model_pods_carry_their_sglang_server(overlay, role):
    docs = _render(overlay)
    values = _values(overlay)
    R = role.upper()
    pod = _pod(_worker_deployments(docs)[role])
    sidecars = [c for c in _sidecars(pod) if c["name"] == "sglang"]
    assert len(sidecars) == 1, "SGLang must run as a native sidecar (restartPolicy: Always)"
    sglang = sidecars[0]
    argv = _argv(sglang, docs)
    assert "sglang.launch_server" in argv and "--enable-metrics" in argv
    assert "--enable-priority-scheduling" in argv  # our lanes' priority, higher first
    assert "--schedule-low-priority-values-first" not in argv
    assert _option(argv, "--port") == "30000"
    model = values[f"{R}_MODEL_ID"]
    # Weights from the model cache; served under the model's id, which the worker asks for.
    assert _option(argv, "--model-path") == f"/models/{model}"
    assert _option(argv, "--served-model-name") == model
    # One GPU per tensor-parallel rank.
    assert _option(argv, "--tp-size") == values[f"{R}_TP"]
    assert _gpu_limit(pod) == int(values[f"{R}_TP"])
    assert _option(argv, "--mem-fraction-static") == values[f"{R}_MEM_FRACTION"]
    # The API key: from a Secret, never a literal; the worker sends the same one.
    key_ref = _option(sglang["args"], "--api-key")
    assert re.fullmatch(r"\$\((\w+)\)", key_ref)
    secret = _secret_env(sglang)[key_ref.strip("$()")]
    worker = _container(pod, "worker")
    assert _secret_env(worker)["TANDEM_MODEL_API_KEY"] == secret
    # Enough requests in flight to keep continuous batching full.
    running = int(_option(argv, "--max-running-requests"))
    env = _env(worker, docs)
    assert int(env["TANDEM_WORKER_CONCURRENCY"]) >= running >= 64
    assert env[f"TANDEM_{R}_BACKEND"] == "sglang"
    assert env[f"TANDEM_{R}_MODEL"] == model
    assert env[f"TANDEM_{R}_URL"] == "http://127.0.0.1:30000"  # its own sidecar only
    assert env[f"TANDEM_{R}_CHAT_TEMPLATE"] == f"/models/{model}/tokenizer_config.json"
    assert env[f"TANDEM_{R}_PARAMS"] == values[f"{R}_PARAMS"]
    # Loading + CUDA graph capture: the startup probe allows at least 10 minutes.
    startup = sglang["startupProbe"]
    assert startup["httpGet"] == {"path": "/health", "port": 30000}
    assert _probe_budget_s(startup) >= 600
    assert sglang["readinessProbe"]["httpGet"]["path"] == "/health"
    volumes = {v["name"]: v for v in pod["volumes"]}
    shm = [m for m in sglang["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert shm and volumes[shm[0]["name"]]["emptyDir"]["medium"] == "Memory"


@pytest.mark.parametrize("overlay", GPU_OVERLAYS)
def test_nothing_outside_a_model_pod_reaches_its_server(overlay):
    docs = _render(overlay)
    model_pods = [w for w in _workloads(docs) if any(c["name"] == "sglang" for c in _sidecars(_pod(w)))]
    assert len(model_pods) == len(MODEL_ROLES)
    # No Service in front of the model servers: each worker uses its own sidecar.
    for svc in _objects(docs, "Service"):
        assert not any(_selects({"matchLabels": svc["spec"]["selector"]}, _pod_labels(w)) for w in model_pods), svc
    for w in _workloads(docs):
        for c in _all_containers(_pod(w)):
            for key, value in _env(c, docs).items():
                if key.endswith("_URL") and "30000" in value:
                    assert urlsplit(value).hostname == "127.0.0.1", (w["metadata"]["name"], key)


@pytest.mark.parametrize("overlay", GPU_OVERLAYS)
def test_gpu_pods_load_weights_from_the_model_cache(overlay):
    docs = _render(overlay)
    values = _values(overlay)
    pvc = _named(docs, "PersistentVolumeClaim", "tandem-model-cache")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["spec"]["storageClassName"] == values["MODEL_CACHE_STORAGE_CLASS"]
    for role in ROLES:
        pod = _pod(_worker_deployments(docs)[role])
        volumes = {v["name"]: v for v in pod["volumes"]}
        for c in _long_running(pod):
            # No download at pod start: the hub is never asked, weights are on the volume.
            if "tandem-gpu" in c["image"]:
                assert _env(c, docs).get("HF_HUB_OFFLINE") == "1", (role, c["name"])
            for mount in c.get("volumeMounts", []):
                if mount["mountPath"] == "/models":
                    claim = volumes[mount["name"]]["persistentVolumeClaim"]
                    assert claim["claimName"] == "tandem-model-cache" and claim["readOnly"]
                    assert mount.get("readOnly") is True
        # What a GPU pod writes (kernels, caches) is requested, so it is not evicted for it.
        gpu_containers = [c for c in _long_running(pod) if "nvidia.com/gpu" in c["resources"].get("limits", {})]
        assert gpu_containers
        for c in gpu_containers:
            assert _quantity(c["resources"]["requests"]["ephemeral-storage"]) >= 2**30
            assert any(m["mountPath"] == "/models" for m in c["volumeMounts"])
        for v in pod["volumes"]:
            if "emptyDir" in v and v["emptyDir"].get("medium") != "Memory":
                assert "sizeLimit" in v["emptyDir"], (role, v["name"])
    # The download Job fills the same volume with every model the pools serve.
    job = _named(docs, "Job", "tandem-model-download")
    download = _container(_pod(job), "download")
    wanted = {values["COORDINATOR_MODEL_ID"], values["EXECUTOR_MODEL_ID"], values["CLASSIFIER_FEATURE_MODEL_ID"]}
    assert wanted <= set(_env(download, docs).values())
    claims = [v["persistentVolumeClaim"] for v in _pod(job)["volumes"] if "persistentVolumeClaim" in v]
    assert claims == [{"claimName": "tandem-model-cache"}]


@pytest.mark.parametrize("overlay", GPU_OVERLAYS)
def test_no_container_sees_gpus_it_did_not_ask_for(overlay):
    """The GPU image sets NVIDIA_VISIBLE_DEVICES=all: a container without a GPU limit would
    otherwise see every GPU of the node."""
    docs = _render(overlay)
    gpu_image = [c for w in _workloads(docs) for c in _all_containers(_pod(w)) if "tandem-gpu" in c["image"]]
    assert len(gpu_image) >= 8
    for c in gpu_image:
        if "nvidia.com/gpu" not in c.get("resources", {}).get("limits", {}):
            assert _env(c, docs).get("NVIDIA_VISIBLE_DEVICES") == "void", c["name"]
        else:
            assert "NVIDIA_VISIBLE_DEVICES" not in _env(c, docs), c["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_classifier_has_a_gpu_only_when_its_feature_backend_needs_one(overlay):
    docs = _render(overlay)
    pod = _pod(_worker_deployments(docs)["classifier"])
    env = _env(_container(pod, "worker"), docs)
    backend = env.get("TANDEM_FEATURE_BACKEND") or env.get("TANDEM_EXECUTOR_BACKEND", "local")
    assert (_gpu_limit(pod) > 0) == (backend == "torch"), (backend, _gpu_limit(pod))
    if overlay in GPU_OVERLAYS:
        # The design chosen (docs/deploy.md): exact features on the classifier's own GPU,
        # as a trained classifier was fitted on them; never top-k estimates over HTTP.
        assert backend == "torch"
        assert env["TANDEM_FEATURE_MODEL"] == f"/models/{_values(overlay)['CLASSIFIER_FEATURE_MODEL_ID']}"
        assert "TANDEM_FEATURE_URL" not in env
        assert pod["nodeSelector"][POOL_LABEL] == _values(overlay)["CLASSIFIER_POOL"]


def test_cpu_overlay_needs_no_gpu():
    docs = _render("cpu")
    for w in _workloads(docs):
        pod = _pod(w)
        assert _gpu_limit(pod) == 0, w["metadata"]["name"]
        assert POOL_LABEL not in pod.get("nodeSelector", {})
        assert all("tandem-gpu" not in c["image"] for c in _all_containers(pod))
    workers = _worker_deployments(docs)
    for role in MODEL_ROLES:
        env = _env(_container(_pod(workers[role]), "worker"), docs)
        assert env[f"TANDEM_{role.upper()}_BACKEND"] == "local"


@pytest.mark.parametrize("overlay", GPU_OVERLAYS)
def test_gpu_node_pools_hold_every_replica_plus_a_surge(overlay):
    """The node pools' caps (values.yaml) hold the GPUs of every replica KEDA may ask for,
    plus one surge pod per Deployment; and the pods' CPU and memory requests fit the nodes
    (as many pods per node as it has GPUs for)."""
    docs = _render(overlay)
    values = _values(overlay)
    workers = _worker_deployments(docs)
    scaled = {s["spec"]["scaleTargetRef"]["name"]: s["spec"] for s in _objects(docs, "ScaledObject")}
    pools: dict[str, list[dict[str, Any]]] = {}
    for role in ROLES:
        pools.setdefault(values[f"{role.upper()}_POOL"], []).append(workers[role])
    for pool, deployments in pools.items():
        key = next(k.removesuffix("_POOL") for k, v in values.items() if k.endswith("_POOL") and v == pool and f"{k}_GPUS_PER_NODE" in values)
        per_node = int(values[f"{key}_POOL_GPUS_PER_NODE"])
        nodes = int(values[f"{key}_POOL_MAX_NODES"])
        cpu = float(values[f"{key}_POOL_NODE_CPU"])
        memory = float(values[f"{key}_POOL_NODE_MEMORY_GIB"]) * 2**30
        needed = 0
        for dep in deployments:
            pod = _pod(dep)
            gpus = _gpu_limit(pod)
            assert per_node % gpus == 0, f"{dep['metadata']['name']}: {gpus} GPUs do not tile a node"
            surge = dep["spec"]["strategy"]["rollingUpdate"]["maxSurge"]
            needed += (scaled[dep["metadata"]["name"]]["maxReplicaCount"] + surge) * gpus
            pods_per_node = per_node // gpus
            assert pods_per_node * _pod_request(pod, "cpu") <= cpu, dep["metadata"]["name"]
            assert pods_per_node * _pod_request(pod, "memory") <= memory, dep["metadata"]["name"]
        assert needed <= per_node * nodes, f"pool {pool}: {needed} GPUs needed, {per_node * nodes} capped"


# --- configuration split: what a change rolls ------------------------------------------------


def _render_modified(tmp_path: Path, overlay: str, edits: dict[str, list[tuple[str, str]]]):
    """Render a copy of k8s/ with text replacements applied to some of its files."""
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    for relative, replacements in edits.items():
        path = copy / relative
        text = path.read_text()
        for old, new in replacements:
            assert old in text, (relative, old)
            text = text.replace(old, new)
        path.write_text(text)
    return _kustomize(copy / "overlays" / overlay)


def _templates(docs) -> dict[str, Any]:
    return {d["metadata"]["name"]: d["spec"]["template"] for d in _objects(docs, "Deployment")}


def test_a_cpu_image_or_api_setting_change_does_not_roll_gpu_pods(tmp_path):
    """Each GPU pod start is a model load: a release of the CPU image, or an API-only
    setting, must leave the GPU pods' templates exactly as they were."""
    before = _templates(_render("gpu"))
    after = _templates(
        _render_modified(
            tmp_path,
            "gpu",
            {
                "overlays/gpu/kustomization.yaml": [("newName: registry.example.com/tandem/tandem\n    newTag: 0.1.0", "newName: registry.example.com/tandem/tandem\n    newTag: 0.1.1")],
                "base/kustomization.yaml": [("TANDEM_RATE_LIMIT_PER_MINUTE=6000", "TANDEM_RATE_LIMIT_PER_MINUTE=9000")],
                "overlays/gpu/values.yaml": [('WEBHOOKS_CONCURRENCY: "16"', 'WEBHOOKS_CONCURRENCY: "32"')],
            },
        )
    )
    for name in ("tandem-coordinator", "tandem-executor", "tandem-classifier"):
        assert after[name] == before[name], f"{name} would roll"
    for name in ("tandem-api", "tandem-webhooks"):
        assert after[name] != before[name], f"{name} should roll"


def test_a_pool_value_change_rolls_only_that_pool(tmp_path):
    before = _templates(_render("gpu"))
    after = _templates(
        _render_modified(
            tmp_path,
            "gpu",
            {"overlays/gpu/values.yaml": [('EXECUTOR_MAX_RUNNING_REQUESTS: "256"', 'EXECUTOR_MAX_RUNNING_REQUESTS: "200"')]},
        )
    )
    changed = {name for name in before if after[name] != before[name]}
    assert changed == {"tandem-executor"}


# --- autoscaling on work in flight --------------------------------------------------------------


def _query_lanes(query: str, metric: str) -> list[str]:
    """The lanes a PromQL selector of `metric` matches (queue="x" or queue=~"regex")."""
    match = re.search(metric + r'\{([^}]*)\}', query)
    assert match, f"{metric} missing from {query}"
    matchers = dict(re.findall(r'(\w+)\s*=~?\s*"([^"]*)"', match.group(1)))
    assert matchers.get("namespace") == "tandem", matchers
    pattern = matchers["queue"]
    candidates = [lane for role in WORKER_QUEUES for lane in lanes(role)]
    return [lane for lane in candidates if re.fullmatch(pattern, lane)]


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("role", WORKER_QUEUES)
def test_each_pool_scales_on_waiting_plus_in_flight_work(overlay, role):
    """Messages waiting in the role's lanes plus stages executing on its workers: a busy
    pool whose lists are empty is not scaled down."""
    docs = _render(overlay)
    dep = _worker_deployments(docs)[role]
    scaled = [s for s in _objects(docs, "ScaledObject") if s["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]]
    assert len(scaled) == 1, f"expected one ScaledObject for {role}"
    spec = scaled[0]["spec"]
    assert spec["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    assert spec["maxReplicaCount"] == int(_values(overlay)[f"{role.upper()}_MAX_REPLICAS"])
    assert spec["cooldownPeriod"] > 0
    # Prometheus down: keep what runs.
    assert spec["fallback"]["behavior"] == "currentReplicasIfHigher"
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus"
    meta = trigger["metadata"]
    assert meta["serverAddress"] == _values(overlay)["PROMETHEUS_ADDRESS"]
    query = meta["query"]
    assert _query_lanes(query, "tandem_queue_depth") == lanes(role)
    assert _query_lanes(query, "tandem_stages_in_flight") == lanes(role)
    # Several scrape targets may report the same list (max by queue); a missing series counts
    # as zero instead of blanking the sum.
    assert "max by (queue) (tandem_queue_depth" in query
    assert query.count("or vector(0)") == 2 and "+" in query
    # One replica per full pod's worth of work.
    worker = _container(_pod(dep), "worker")
    assert meta["threshold"] == _env(worker, docs)["TANDEM_WORKER_CONCURRENCY"]
    # KEDA owns the replica count: a replicas field would fight it on every apply.
    assert "replicas" not in dep["spec"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_worker_model_server_and_the_reconciler_is_a_scrape_target(overlay):
    docs = _render(overlay)
    config = _config(docs)
    assert int(config["TANDEM_METRICS_PORT"]) == METRICS_PORT  # on by default
    monitors = _objects(docs, "PodMonitor")
    targets = [
        *_worker_deployments(docs).values(),
        _named(docs, "Deployment", "tandem-reconciler"),
        _named(docs, "Deployment", "tandem-api"),
    ]
    for w in targets:
        labels = _pod_labels(w)
        ports = {p["name"]: p["containerPort"] for c in _long_running(_pod(w)) for p in c.get("ports", [])}
        wanted = {8000} if labels["app.kubernetes.io/component"] == "api" else {METRICS_PORT}
        if any(c["name"] == "sglang" for c in _sidecars(_pod(w))):
            wanted.add(30000)  # SGLang's own /metrics
        scraped = {
            ports[ep["port"]]
            for m in monitors
            if _selects(m["spec"]["selector"], labels)
            for ep in m["spec"]["podMetricsEndpoints"]
            if ep["port"] in ports and ep["path"] == "/metrics"
        }
        assert scraped == wanted, (w["metadata"]["name"], scraped)
        assert w["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == "true"


# --- security -----------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_meets_the_restricted_pod_security_standard(overlay):
    docs = _render(overlay)
    namespace = _named(docs, "Namespace", "tandem")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for w in _workloads(docs):
        name = w["metadata"]["name"]
        pod = _pod(w)
        ctx = pod["securityContext"]
        assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] > 0, name
        assert ctx["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod.get("automountServiceAccountToken") is False, name
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            assert not pod.get(flag), (name, flag)
        for volume in pod.get("volumes", []):
            kinds = set(volume) - {"name"}
            assert kinds <= RESTRICTED_VOLUMES, (name, volume)
        for c in _all_containers(pod):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, (name, c["name"])
            assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), (name, c["name"])
            assert sc["readOnlyRootFilesystem"] is True, (name, c["name"])
            assert not sc.get("privileged"), (name, c["name"])
            assert sc.get("runAsUser", ctx["runAsUser"]) > 0, (name, c["name"])
            assert all("hostPort" not in p for p in c.get("ports", [])), (name, c["name"])
            # Every container has what it writes on a volume, memory and disk bounded.
            limits = c["resources"]["limits"]
            assert "memory" in limits and "ephemeral-storage" in limits, (name, c["name"])
            assert {"cpu", "memory", "ephemeral-storage"} <= set(c["resources"]["requests"]), (name, c["name"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_admit_only_what_each_component_needs(overlay):
    docs = _render(overlay)
    policies = _objects(docs, "NetworkPolicy")
    default = [p for p in policies if p["spec"]["podSelector"] == {} and p["spec"]["policyTypes"] == ["Ingress"] and not p["spec"].get("ingress")]
    assert len(default) == 1, "no default deny of ingress"
    allowing = [p for p in policies if p not in default]
    for p in allowing:
        for rule in p["spec"]["ingress"]:
            # No rule open to every source or every port.
            assert rule.get("from") and rule.get("ports"), p["metadata"]["name"]
    values = _values(overlay)

    def admitted(workload) -> dict[int, list[dict[str, Any]]]:
        out: dict[int, list[dict[str, Any]]] = {}
        for p in allowing:
            if _selects(p["spec"]["podSelector"], _pod_labels(workload)):
                for rule in p["spec"]["ingress"]:
                    for port in rule["ports"]:
                        out.setdefault(port["port"], []).extend(rule["from"])
        return out

    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": values["MONITORING_NAMESPACE"]}}}
    for w in _workloads(docs):
        if w["kind"] == "Job":
            assert not admitted(w), w["metadata"]["name"]
            continue
        component = _pod_labels(w)["app.kubernetes.io/component"]
        rules = admitted(w)
        assert rules, f"no NetworkPolicy lets anything reach {w['metadata']['name']}"
        if component == "api":
            ingress = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": values["INGRESS_NAMESPACE"]}}}
            assert set(rules) == {8000} and ingress in rules[8000] and monitoring in rules[8000]
        elif component in (*WORKER_QUEUES, "reconciler"):
            model_server = any(c["name"] == "sglang" for c in _sidecars(_pod(w)))
            assert set(rules) == ({METRICS_PORT, 30000} if model_server else {METRICS_PORT}), component
            assert all(sources == [monitoring] for sources in rules.values()), component
        elif component == "postgres":
            assert rules == {5432: [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "tandem", "app.kubernetes.io/component": "pgbouncer"}}}]}
        elif component in ("pgbouncer", "redis"):
            (port,) = rules
            for source in rules[port]:
                assert set(source) == {"podSelector"}, source  # this namespace's pods only
        else:
            raise AssertionError(f"no expectation for {component}")


# --- the pooler in front of Postgres ----------------------------------------------------------------


def _pgbouncer_settings(text: str) -> dict[str, str]:
    return dict(
        (k.strip(), v.strip())
        for k, v in (line.split("=", 1) for line in text.splitlines() if "=" in line and not line.lstrip().startswith(";"))
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_process_reaches_postgres_through_pgbouncer(overlay):
    docs = _render(overlay)
    assert _config(docs)["TANDEM_DB_POOLER"] == "pgbouncer"
    dep = _named(docs, "Deployment", "tandem-pgbouncer")
    svc = _named(docs, "Service", "tandem-pgbouncer")
    assert svc["spec"]["ports"][0]["port"] == 6432
    files = _config_map(docs, "tandem-pgbouncer-config-")["data"]
    settings = _pgbouncer_settings(files["pgbouncer.ini"])
    assert settings["pool_mode"] == "transaction"
    assert settings["listen_port"] == "6432"
    assert _argv(_container(_pod(dep), "pgbouncer")) == ["pgbouncer", "/etc/pgbouncer/conf/pgbouncer.ini"]
    # The app's database URL names PgBouncer's Service.
    secrets = {s["metadata"]["name"]: s for s in _objects(docs, "Secret")}
    if secrets:
        url = base64.b64decode(secrets["tandem-secrets"]["data"]["TANDEM_DATABASE_URL"]).decode()
        postgres = _named(docs, "Service", "tandem-postgres")
        upstream = re.search(r"host=(\S+) port=(\d+)", files["databases.ini"])
        assert upstream.groups() == ("tandem-postgres", str(postgres["spec"]["ports"][0]["port"]))
    else:
        url = next(line.split("=", 1)[1] for line in (K8S / "secrets.env.example").read_text().splitlines() if line.startswith("TANDEM_DATABASE_URL="))
    parts = urlsplit(url)
    assert (parts.hostname, parts.port) == ("tandem-pgbouncer", 6432)
    assert _pod_request(_pod(dep), "cpu") <= 1  # single-threaded


@contextlib.contextmanager
def _pgbouncer(admin_url: str, pool_size: int | None = None) -> Iterator[str]:
    """Debian's pgbouncer running the shipped pgbouncer.ini in front of the test Postgres;
    yields a client URL (database name to be set). Only paths, address and port differ."""
    from sqlalchemy.engine import make_url

    from tests import infra

    binary = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin")
    if binary is None:
        pytest.skip("pgbouncer is not installed: run scripts/install_test_deps.sh (as root)")
    server = make_url(admin_url)
    directory = Path(tempfile.mkdtemp(prefix="tandem-pgbouncer-"))
    directory.chmod(0o755)  # pgbouncer refuses to run as root: it runs as nobody then
    port = infra.free_port()
    ini = PGBOUNCER_INI.read_text()
    for key, value in (("listen_addr", "127.0.0.1"), ("listen_port", str(port))):
        ini = re.sub(rf"^{key} = .*$", f"{key} = {value}", ini, flags=re.M)
    if pool_size is not None:
        ini = re.sub(r"^default_pool_size = .*$", f"default_pool_size = {pool_size}", ini, flags=re.M)
        ini = re.sub(r"^reserve_pool_size = .*$", "reserve_pool_size = 0", ini, flags=re.M)
    ini = ini.replace("/etc/pgbouncer/auth/userlist.txt", str(directory / "userlist.txt"))
    ini = ini.replace("/etc/pgbouncer/conf/databases.ini", str(directory / "databases.ini"))
    (directory / "pgbouncer.ini").write_text(ini)
    (directory / "databases.ini").write_text(f"* = host={server.host} port={server.port or 5432}\n")
    password = "pgbouncer-test"
    (directory / "userlist.txt").write_text(f'"{server.username}" "{password}"\n')
    for f in directory.iterdir():
        f.chmod(0o644)
    command = [binary, str(directory / "pgbouncer.ini")]
    if os.geteuid() == 0:
        command[1:1] = ["-u", "nobody"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        infra.wait_for(lambda: infra.port_open("127.0.0.1", port) or proc.poll() is not None, 15, "pgbouncer")
        if proc.poll() is not None:
            raise AssertionError(f"pgbouncer did not start:\n{proc.stdout.read()}")
        yield server.set(host="127.0.0.1", port=port, password=password).render_as_string(hide_password=False)
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(directory, ignore_errors=True)


def _alternate_identical_queries(url: str, pooler: str, monkeypatch) -> None:
    """Two pooled connections take turns running the same statement: psycopg prepares it on
    the server after a few executions, unless the engine is told about PgBouncer."""
    from sqlalchemy import text

    from services.settings import get_settings
    from services.storage import db

    monkeypatch.setenv("TANDEM_DB_POOLER", pooler)
    get_settings.cache_clear()
    db.dispose_engines()
    try:
        engine = db.get_engine(url)
        with engine.connect() as a, engine.connect() as b:
            for i in range(12):
                for connection in (a, b):
                    value = connection.execute(text("SELECT CAST(:n AS integer) + 1"), {"n": i}).scalar_one()
                    connection.commit()
                    assert value == i + 1
    finally:
        db.dispose_engines()
        get_settings.cache_clear()


def test_the_shipped_pgbouncer_config_carries_the_apps_engine(postgres_admin_url, monkeypatch):
    """Through the shipped pgbouncer.ini (transaction pooling, one server connection so that
    two clients' transactions share it): the engine configured for PgBouncer works, and the
    same engine without that setting breaks, which is why it exists."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import DBAPIError

    from tests import infra

    with infra.scratch_database(postgres_admin_url) as direct, _pgbouncer(postgres_admin_url, pool_size=1) as pooled:
        url = make_url(pooled).set(database=make_url(direct).database).render_as_string(hide_password=False)
        _alternate_identical_queries(url, "pgbouncer", monkeypatch)
        with pytest.raises(DBAPIError, match="prepared statement"):
            _alternate_identical_queries(url, "none", monkeypatch)


def test_concurrent_upgrades_through_pgbouncer_take_turns(postgres_admin_url, tmp_path):
    """The migration lock is a transaction-level one: it holds through PgBouncer's transaction
    pooling, where a session lock would not."""
    from sqlalchemy.engine import make_url

    from tests import infra
    from tests.test_migrations import differences, run_concurrent_upgrades

    with infra.scratch_database(postgres_admin_url) as direct, _pgbouncer(postgres_admin_url) as pooled:
        url = make_url(pooled).set(database=make_url(direct).database).render_as_string(hide_password=False)
        outputs = run_concurrent_upgrades(direct, url, tmp_path, env={"TANDEM_DB_POOLER": "pgbouncer"})
        assert sorted(out.count("Running upgrade") > 0 for out in outputs) == [False, True]
        assert differences(direct) == []


def test_migrations_take_a_transaction_level_advisory_lock():
    env = (ROOT / "migrations" / "env.py").read_text()
    assert "pg_advisory_xact_lock" in env and "pg_advisory_lock(" not in env


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
    for role, dep in _worker_deployments(docs).items():
        worker = _container(_pod(dep), "worker")
        # A broker outage must not restart every worker: liveness asks the process itself
        # (its metrics port), readiness asks the broker.
        assert worker["livenessProbe"]["httpGet"] == {"path": "/metrics", "port": METRICS_PORT}
        ready = " ".join(worker["readinessProbe"]["exec"]["command"])
        assert "inspect ping" in ready and f"{role}@" in ready, ready
    reconciler = _container(_pod(_named(docs, "Deployment", "tandem-reconciler")), "reconciler")
    assert reconciler["livenessProbe"]["httpGet"]["port"] == METRICS_PORT


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_api_drains_before_it_stops(overlay):
    docs = _render(overlay)
    dep = _named(docs, "Deployment", "tandem-api")
    api = _container(_pod(dep), "api")
    sleep = api["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep" and int(sleep[1]) >= 5
    # The preStop pause, then gunicorn's 30 s graceful stop, within the grace period.
    assert _pod(dep)["terminationGracePeriodSeconds"] > int(sleep[1]) + 30
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_migration_runs_before_any_tandem_pod(overlay):
    docs = _render(overlay)
    jobs = [j for j in _objects(docs, "Job") if any(_argv(c) == MIGRATE_COMMAND for c in _pod(j)["containers"])]
    assert len(jobs) == 1, "expected one migration Job running `tandem db upgrade`"
    tandem_deployments = [
        d for d in _objects(docs, "Deployment") if any(_argv(c)[:1] in (["tandem"], ["celery"]) for c in _pod(d)["containers"])
    ]
    assert len(tandem_deployments) == 2 + len(WORKER_QUEUES)  # api, reconciler, one per queue
    for dep in tandem_deployments:
        pod = _pod(dep)
        first = pod["initContainers"][0]
        assert _argv(first) == MIGRATE_COMMAND, f"{dep['metadata']['name']}: {first['name']}"
        assert first.get("restartPolicy") != "Always"  # must run to completion first
        main_db = [_secret_env(c)["TANDEM_DATABASE_URL"] for c in pod["containers"]]
        assert main_db and _secret_env(first)["TANDEM_DATABASE_URL"] == main_db[0]
        # Same image as the pod's own containers: a CPU image release does not roll GPU pods.
        assert first["image"] == pod["containers"][0]["image"], dep["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_first_upgrade_phase_holds_what_the_migration_job_needs(overlay):
    """docs/deploy.md applies `-l app.kubernetes.io/component in (config,migrate,pgbouncer)`
    first: the Job reaches Postgres through PgBouncer."""
    docs = _render(overlay)
    phase1 = {
        (d["kind"], d["metadata"]["name"])
        for d in docs
        if d["metadata"].get("labels", {}).get("app.kubernetes.io/component") in ("config", "migrate", "pgbouncer")
    }
    job = _named(docs, "Job", "tandem-migrate")
    pod = _pod(job)
    needed = {("Namespace", "tandem"), ("ServiceAccount", pod["serviceAccountName"])}
    needed |= {("ConfigMap", src["configMapRef"]["name"]) for c in pod["containers"] for src in c.get("envFrom", [])}
    needed |= {("Secret", name) for name, _ in _secret_refs([job]) if _objects(docs, "Secret")}
    pgbouncer = _named(docs, "Deployment", "tandem-pgbouncer")
    needed |= {("Deployment", "tandem-pgbouncer"), ("Service", "tandem-pgbouncer")}
    needed |= {("ConfigMap", v["configMap"]["name"]) for v in _pod(pgbouncer)["volumes"] if "configMap" in v}
    if _objects(docs, "Secret"):
        needed |= {("Secret", v["secret"]["secretName"]) for v in _pod(pgbouncer)["volumes"] if "secret" in v}
    assert needed <= phase1, needed - phase1
    # Only the Job, PgBouncer and configuration: no tandem workload starts in phase 1.
    workloads = {(k, n) for k, n in phase1 if k in ("Deployment", "StatefulSet")}
    assert workloads == {("Deployment", "tandem-pgbouncer")}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_disruption_budgets_cover_every_replicated_deployment(overlay):
    docs = _render(overlay)
    pdbs = _objects(docs, "PodDisruptionBudget")
    deployments = [
        _named(docs, "Deployment", "tandem-api"),
        _named(docs, "Deployment", "tandem-pgbouncer"),
        *_worker_deployments(docs).values(),
    ]
    for dep in deployments:
        matching = [p for p in pdbs if _selects(p["spec"]["selector"], _pod_labels(dep))]
        assert len(matching) == 1, f"{dep['metadata']['name']}: {len(matching)} PDBs"
        spec = matching[0]["spec"]
        # A budget that can never be met blocks node drains forever; a pod stuck unready
        # (a model that never loads) may always go.
        if "minAvailable" in spec:
            assert dep["spec"]["replicas"] > spec["minAvailable"]
        else:
            assert spec["maxUnavailable"] >= 1
        assert spec["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_period_outlasts_a_stage_and_undercuts_redelivery(overlay, monkeypatch):
    docs = _render(overlay)
    config = _config(docs)
    deadline = float(config["TANDEM_STAGE_DEADLINE_S"])
    http_timeout = float(config["TANDEM_HTTP_TIMEOUT_S"])
    stage_timeout = float(config["TANDEM_STAGE_TIMEOUT_S"])
    # The visibility timeout the workers compute from this very configuration.
    monkeypatch.setenv("TANDEM_VISIBILITY_TIMEOUT_S", config["TANDEM_VISIBILITY_TIMEOUT_S"])
    from services.settings import get_settings

    get_settings.cache_clear()
    try:
        from workers.app import make_app

        visibility = make_app().conf.broker_transport_options["visibility_timeout"]
    finally:
        get_settings.cache_clear()
    assert visibility == int(config["TANDEM_VISIBILITY_TIMEOUT_S"])
    for role, dep in _worker_deployments(docs).items():
        grace = _pod(dep)["terminationGracePeriodSeconds"]
        # Otherwise Redis hands a stage that is still finishing to a second worker.
        assert grace < visibility, f"{role}: grace {grace} >= visibility_timeout {visibility}"
        if role not in ROLES:
            continue  # runs no stages
        # A warm shutdown lets every stage it holds run to its wall-clock limit.
        assert stage_timeout < grace, f"{role}: stage timeout {stage_timeout} >= grace {grace}"
        assert grace >= deadline and grace >= http_timeout


# --- secrets and references -----------------------------------------------------------------

REAL_TOKEN_PATTERNS = (
    re.compile(r"hf_[A-Za-z0-9]{30,}"),
    re.compile(r"AKIA[0-9A-Z]{16}"),
    re.compile(r"sk-[A-Za-z0-9_-]{20,}"),
    re.compile(r"gh[pousr]_[A-Za-z0-9]{30,}"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
)
SECRET_KEY_NAMES = re.compile(r"PASSWORD|TOKEN|SECRET|API_?KEY|URL|USERLIST", re.IGNORECASE)


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
    assert _looks_real("userlist.txt", '"tandem" "hunter2"')
    assert not _looks_real("REDIS_PASSWORD", "dev-only-change-me")
    assert not _looks_real("TANDEM_REDIS_URL", "redis://redis:6379/0")
    assert not _looks_real("userlist.txt", '"tandem" "dev-only-change-me"')


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_secret_carries_a_real_looking_value(overlay):
    docs = _render(overlay)
    for secret in _objects(docs, "Secret"):
        values = {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
        values.update(secret.get("stringData", {}))
        for key, value in values.items():
            assert not _looks_real(key, value), f"{secret['metadata']['name']}.{key}"


def test_production_overlay_ships_no_secret():
    assert not _objects(_render("gpu"), "Secret"), "gpu overlay must take its Secrets from outside git"


def _secret_refs(docs) -> set[tuple[str, str]]:
    refs = set()
    for workload in _workloads(docs):
        pod = _pod(workload)
        for c in _all_containers(pod):
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref and not ref.get("optional"):
                    refs.add((ref["name"], ref["key"]))
        for v in pod.get("volumes", []):
            if "secret" in v:
                items = v["secret"].get("items") or [{"key": "userlist.txt"}]
                refs |= {(v["secret"]["secretName"], item["key"]) for item in items}
    return refs


def _example_secret_keys() -> set[tuple[str, str]]:
    keys = {("tandem-pgbouncer", "userlist.txt")} if (K8S / "pgbouncer-userlist.txt.example").is_file() else set()
    for line in (K8S / "secrets.env.example").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keys.add(("tandem-secrets", line.split("=", 1)[0]))
    return keys


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_secret_and_config_reference_resolves(overlay):
    docs = _render(overlay)
    rendered = {s["metadata"]["name"]: set(s.get("data", {})) for s in _objects(docs, "Secret")}
    for name, key in _secret_refs(docs):
        if rendered:
            assert key in rendered.get(name, set()), f"secret {name} lacks {key}"
        else:  # created by the operator from k8s/secrets.env.example, pgbouncer-userlist.txt.example
            assert (name, key) in _example_secret_keys(), (name, key)
    maps = {d["metadata"]["name"]: d.get("data", {}) for d in _objects(docs, "ConfigMap")}
    for workload in _workloads(docs):
        pod = _pod(workload)
        for c in _all_containers(pod):
            for src in c.get("envFrom", []):
                assert src["configMapRef"]["name"] in maps
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("configMapKeyRef")
                if ref:
                    assert ref["key"] in maps.get(ref["name"], {}), ref
            # Every $(VAR) the container uses is defined.
            for word in _argv(c, docs) + list(_env(c, docs).values()):
                unresolved = set(re.findall(r"\$\((\w+)\)", word)) - set(_secret_env(c))
                assert not unresolved, (workload["metadata"]["name"], c["name"], word)
        for v in pod.get("volumes", []):
            if "configMap" in v:
                assert v["configMap"]["name"] in maps


def test_committed_deploy_files_hold_no_real_secrets():
    files = [COMPOSE_FILE, COMPOSE_GPU_FILE, *K8S.rglob("*.yaml"), *K8S.rglob("*.example"), *K8S.rglob("*.txt")]
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

    def broken(doc, edit):
        copy = yaml.safe_load(yaml.safe_dump(doc))
        edit(copy)
        return validator.validate_document(copy, version)

    scaled = _named(docs, "ScaledObject", "tandem-executor")
    assert validator.validate_document(scaled, version) == []
    assert broken(scaled, lambda d: d["spec"]["triggers"][0]["metadata"].pop("query"))
    assert broken(scaled, lambda d: d["spec"]["triggers"][0]["metadata"].update(threshold="many"))
    assert broken(scaled, lambda d: d["spec"].update(maxReplicas=3))  # not a KEDA field
    monitor = _named(docs, "PodMonitor", "tandem-metrics")
    assert validator.validate_document(monitor, version) == []
    assert broken(monitor, lambda d: d["spec"]["podMetricsEndpoints"][0].update(targetPort=9100))
    dep = _named(docs, "Deployment", "tandem-api")
    assert broken(dep, lambda d: d["spec"]["template"]["spec"]["containers"][0].update(livenessProbes={}))
    missing_target = yaml.safe_load(yaml.safe_dump(scaled))
    missing_target["spec"]["scaleTargetRef"]["name"] = "nope"
    assert validator.cross_reference([missing_target])


# --- docker compose -----------------------------------------------------------------------


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command") or []
    return command.split() if isinstance(command, str) else list(command)


def _compose_consumers(services: dict[str, Any]) -> dict[str, str]:
    consumers: dict[str, str] = {}
    for name, svc in services.items():
        argv = _command(svc)
        if argv[:4] == ["celery", "-A", "workers", "worker"] and not svc.get("profiles"):
            role = _option(argv, "-Q").split(",")[0]
            assert role not in consumers, f"{role} consumed twice"
            assert _option(argv, "-Q").split(",") == lanes(role)
            assert _option(argv, "--pool") == "threads"
            consumers[role] = name
    return consumers


def test_compose_up_alone_starts_a_working_cpu_stack():
    """`docker compose up` (no profile) must run a worker for every queue: jobs would stay
    queued forever otherwise."""
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
    consumers = _compose_consumers(services)
    assert set(consumers) == set(WORKER_QUEUES)
    for name in consumers.values():
        svc = services[name]
        env = svc["environment"]
        assert svc["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert env["TANDEM_METRICS_PORT"] == str(METRICS_PORT)  # metrics on by default
        assert _option(_command(svc), "--concurrency") == env["TANDEM_WORKER_CONCURRENCY"]
        for model_role in MODEL_ROLES:
            assert env.get(f"TANDEM_{model_role.upper()}_BACKEND", "local") == "local"
        assert "tandem-gpu" not in svc["image"]


def _compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True, check=False).returncode == 0:
        return [docker, "compose"]
    standalone = shutil.which("docker-compose", path=f"{_tools_bin()}{os.pathsep}{os.environ.get('PATH', '')}")
    return [standalone] if standalone else None


def _compose_config(*files: Path, profiles: tuple[str, ...] = ()) -> dict[str, Any]:
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no docker compose CLI: run scripts/install_test_deps.sh")
    args = [*cli]
    for f in files:
        args += ["-f", str(f)]
    for p in profiles:
        args += ["--profile", p]
    proc = subprocess.run([*args, "config", "--format", "json"], capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_compose_gpu_stack_replaces_the_cpu_workers():
    """The GPU file on top of the CPU one: the same worker services, now on the GPU image and
    SGLang, so no CPU worker runs beside them; every tandem process through PgBouncer."""
    config = _compose_config(COMPOSE_FILE, COMPOSE_GPU_FILE)
    services = config["services"]
    consumers = _compose_consumers(services)
    assert set(consumers) == set(WORKER_QUEUES)
    assert _command(services["pgbouncer"]) == ["pgbouncer", "/etc/pgbouncer/conf/pgbouncer.ini"]
    assert services["pgbouncer"]["user"].split(":")[0] != "0"
    for name in ("api", "reconciler", *consumers.values()):
        env = services[name]["environment"]
        assert urlsplit(env["TANDEM_DATABASE_URL"]).hostname == "pgbouncer", name
        assert env["TANDEM_DB_POOLER"] == "pgbouncer", name
    for role in MODEL_ROLES:
        server = services[f"sglang-{role}"]
        argv = _command(server)
        assert "sglang.launch_server" in argv and "--enable-metrics" in argv
        # our requests' priority (SGLANG_PRIORITY) is read, higher values first
        assert "--enable-priority-scheduling" in argv
        assert "--schedule-low-priority-values-first" not in argv
        model = _option(argv, "--served-model-name")
        assert _option(argv, "--model-path") == f"/models/{model}"
        assert _option(argv, "--api-key")
        assert all(v["read_only"] for v in server["volumes"] if v["target"] == "/models")
        assert server["depends_on"]["model-download"]["condition"] == "service_completed_successfully"
        worker = services[consumers[role]]
        env = worker["environment"]
        assert "tandem-gpu" in worker["image"]
        assert env[f"TANDEM_{role.upper()}_BACKEND"] == "sglang"
        assert env[f"TANDEM_{role.upper()}_URL"] == f"http://sglang-{role}:30000"
        assert env[f"TANDEM_{role.upper()}_MODEL"] == model
        assert env["TANDEM_MODEL_API_KEY"] == _option(argv, "--api-key")
        assert env["NVIDIA_VISIBLE_DEVICES"] == "void"
        assert worker["depends_on"][f"sglang-{role}"]["condition"] == "service_healthy"
        concurrency = _option(_command(worker), "--concurrency")
        assert concurrency == env["TANDEM_WORKER_CONCURRENCY"] == _option(argv, "--max-running-requests")
        assert int(concurrency) >= 64
    classifier = services[consumers["classifier"]]
    assert classifier["environment"]["TANDEM_FEATURE_BACKEND"] == "torch"
    assert classifier["environment"]["TANDEM_FEATURE_MODEL"].startswith("/models/")
    assert classifier["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    # The monitoring profile's Prometheus scrapes every worker, the reconciler and both servers.
    monitored = _compose_config(COMPOSE_FILE, COMPOSE_GPU_FILE, profiles=("monitoring",))
    scrape = yaml.safe_load(monitored["configs"]["prometheus"]["content"])
    targets = {t for job in scrape["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    wanted = {f"{name}:{METRICS_PORT}" for name in [*consumers.values(), "reconciler"]}
    wanted |= {"sglang-coordinator:30000", "sglang-executor:30000", "api:8000"}
    assert wanted <= targets


@pytest.mark.parametrize("files", [(COMPOSE_FILE,), (COMPOSE_FILE, COMPOSE_GPU_FILE)], ids=["cpu", "gpu"])
def test_compose_files_validate(files):
    assert _compose_config(*files)["services"]


# --- images -----------------------------------------------------------------------------


def test_images_are_built_as_documented_and_run_as_non_root():
    cpu = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM \$\{PYTHON_IMAGE\} AS builder", cpu, re.M)
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in cpu
    assert "build-essential" in cpu and "cmake" in cpu
    assert re.search(r"^COPY --from=builder /opt/venv", cpu, re.M), "runtime must be a separate stage"
    gpu = (ROOT / "Dockerfile.gpu").read_text()
    tag = re.search(r"^ARG SGLANG_IMAGE=(lmsysorg/sglang:v[0-9][\w.-]+)$", gpu, re.M)
    assert tag, "Dockerfile.gpu must pin a concrete lmsysorg/sglang tag"
    assert tag.group(1) in (ROOT / "docs" / "deploy.md").read_text(), "document the SGLang tag"
    for text in (cpu, gpu):
        users = re.findall(r"^USER (\S+)$", text, re.M)
        assert users and users[-1].split(":")[0] == "10001"
        assert re.search(r"HOME=/tmp", text)  # the root filesystem is read-only when deployed


# --- dashboard of the serving path ------------------------------------------------------------

# The metrics the autoscaling contract names (exported by the workers and the reconciler),
# and SGLang's own (sglang/srt/metrics/collector.py of the pinned SGLang release).
SCALING_METRICS = {"tandem_queue_depth": {"queue"}, "tandem_stages_in_flight": {"queue"}}
TARGET_LABELS = {"namespace", "pod"}  # added by the scrape, not by the exporter
SGLANG_METRICS = {
    "sglang:num_running_reqs",
    "sglang:num_queue_reqs",
    "sglang:token_usage",
    "sglang:gen_throughput",
    "sglang:cache_hit_rate",
    "sglang:num_used_tokens",
    "sglang:time_to_first_token_seconds_bucket",
    "sglang:e2e_request_latency_seconds_bucket",
}


def test_serving_dashboard_shows_the_scaling_metrics_and_the_model_servers():
    document = json.loads((ROOT / "dashboards" / "serving.json").read_text())
    exprs = [t["expr"] for p in document["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 8
    used_tandem: set[str] = set()
    used_sglang: set[str] = set()
    for expr in exprs:
        tandem = set(re.findall(r"\b(tandem_[a-z_]+)", expr))
        sglang = set(re.findall(r"(sglang:[a-z_]+)", expr))
        assert tandem or sglang, expr
        assert tandem <= set(SCALING_METRICS), expr
        assert sglang <= SGLANG_METRICS, expr
        used_tandem |= tandem
        used_sglang |= sglang
        for metric, matchers in re.findall(r"((?:tandem_|sglang:)[a-z_]+)\{([^}]*)\}", expr):
            allowed = SCALING_METRICS.get(metric, set()) | TARGET_LABELS
            for label in re.findall(r"([a-z_]+)\s*(?:=~|!=|!~|=)", matchers):
                assert label in allowed, (metric, label)
        for grouping in re.findall(r"by \(([^)]*)\)", expr):
            for label in (g.strip() for g in grouping.split(",")):
                assert label in {"queue", "le", "role", *TARGET_LABELS}, (expr, label)
    # Everything KEDA's query uses is on the dashboard, and SGLang's batch and cache state.
    keda_metrics = {
        m
        for s in _objects(_render("gpu"), "ScaledObject")
        for m in re.findall(r"\b(tandem_[a-z_]+)", s["spec"]["triggers"][0]["metadata"]["query"])
    }
    assert keda_metrics == used_tandem == set(SCALING_METRICS)
    assert {"sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:token_usage", "sglang:gen_throughput"} <= used_sglang


def test_pool_settings_shape_every_process_engine(database_url, monkeypatch):
    """TANDEM_DB_POOL_SIZE / _MAX_OVERFLOW bound one process's connections (the numbers the
    sizing in docs/deploy.md multiplies by the pods); TANDEM_DB_POOLER=pgbouncer turns off
    server-side prepared statements on every connection."""
    from services.settings import Settings, get_settings
    from services.storage import db

    for pooler, threshold in (("pgbouncer", None), ("none", 5)):
        monkeypatch.setenv("TANDEM_DB_POOL_SIZE", "3")
        monkeypatch.setenv("TANDEM_DB_MAX_OVERFLOW", "2")
        monkeypatch.setenv("TANDEM_DB_POOLER", pooler)
        get_settings.cache_clear()
        db.dispose_engines()
        try:
            engine = db.get_engine(database_url)
            assert (engine.pool.size(), engine.pool._max_overflow) == (3, 2)
            with engine.connect() as connection:
                assert connection.connection.dbapi_connection.prepare_threshold == threshold
        finally:
            db.dispose_engines()
            get_settings.cache_clear()
    monkeypatch.setenv("TANDEM_WORKER_CONCURRENCY", "256")
    assert Settings().worker_concurrency == 256
    monkeypatch.setenv("TANDEM_WORKER_CONCURRENCY", "0")
    with pytest.raises(ValueError, match="worker_concurrency"):
        Settings()
