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
# Missing tools are installed, idempotently, by the installers this script shares with the test
# suite (scripts/install_test_deps.sh, sourced): kubectl with kustomize >= v5, the docker compose
# CLI, pgbouncer (best effort: its tests in tests/test_deploy.py skip without it). Its own:
#   kubernetes-validate (+ jsonschema, PyYAML): pip, into $PYTHON (default: .venv/bin/python);
#   checkov at the version pinned in pyproject.toml's deploy extras: the one in $PYTHON when it
#     is that version, else its own virtualenv under $TANDEM_TOOLS_DIR (checkov pins many
#     libraries; its own environment keeps them away from the project's).
# Downloaded binaries go to $TANDEM_TOOLS_DIR (default ~/.cache/tandem-deploy-tools/bin).
#
# Environment: K8S_VERSION (default 1.32.0), PYTHON, TANDEM_TOOLS_DIR, RENDER_DIR (keep the
# rendered manifests there instead of a temporary directory).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

K8S_VERSION="${K8S_VERSION:-1.32.0}"
# TOOLS_DIR, PY, log, apt_install, pip_retry, ensure_kubectl, ensure_compose (COMPOSE),
# ensure_pgbouncer: shared with the test suite's set-up.
# shellcheck source=scripts/install_test_deps.sh
source "$ROOT/scripts/install_test_deps.sh"

die() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

ensure_python_deps() {
  if "$PY" -c 'import kubernetes_validate, jsonschema, yaml' 2> /dev/null; then return 0; fi
  log "installing kubernetes-validate into $PY"
  pip_retry install --quiet kubernetes-validate || die "could not install kubernetes-validate"
  "$PY" -c 'import kubernetes_validate, jsonschema, yaml' || die "kubernetes-validate unusable"
}

CHECKOV=()
checkov_version() {
  "$PY" - "$ROOT/pyproject.toml" << 'EOF'
import re, sys, tomllib
extra = tomllib.load(open(sys.argv[1], "rb"))["project"]["optional-dependencies"]["deploy"]
print(next(re.sub(r"^checkov==", "", d) for d in extra if d.startswith("checkov==")))
EOF
}

ensure_checkov() {
  local version venv
  version="$(checkov_version)" || die "no checkov==VERSION in pyproject.toml's deploy extras"
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

# ---------------------------------------------------------------------------------------
ensure_pgbouncer || log "could not install pgbouncer; its tests will skip"
ensure_kubectl || die "could not install kubectl (with kustomize >= v5)"
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

ensure_compose || die "no docker compose available"
log "compose: $("${COMPOSE[@]}" version 2> /dev/null | head -n 1)"
"${COMPOSE[@]}" -f docker-compose.yml config -q || die "docker-compose.yml (CPU stack)"
"${COMPOSE[@]}" -f docker-compose.yml -f docker-compose.gpu.yml config -q \
  || die "docker-compose.yml + docker-compose.gpu.yml (GPU stack)"

log "deploy checks passed: ${overlays[*]} (validated, policy-scanned) + compose (CPU, GPU)"
