# Image for the API, the migration job, the reconciler and the CPU (local-engine) workers.
#
#   docker build -t tandem:local .
#
# Two stages: the builder has a C/C++ toolchain because llama-cpp-python (pinned in
# pyproject.toml) ships as an sdist and compiles llama.cpp; the runtime stage only gets the
# finished virtualenv, so no compiler ends up in the image that runs.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder

RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake \
 && rm -rf /var/lib/apt/lists/*

# GGML_NATIVE=OFF: build for a portable x86-64 baseline, not for the build host's CPU, so the
# image runs on whatever node the scheduler picks. No CUDA in this image.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_CUDA=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL=4

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src

# Dependencies first, in their own layer: compiling llama.cpp takes minutes and should not be
# redone for every change to the application code. The list comes from pyproject.toml itself.
COPY pyproject.toml ./
RUN python -c "import tomllib; d = tomllib.load(open('pyproject.toml', 'rb')); print('\n'.join(d['project']['dependencies']))" > /tmp/requirements.txt \
 && pip install --upgrade pip wheel \
 && pip install -r /tmp/requirements.txt

# Then the project itself (services/, workers/, migrations/), without touching the deps.
COPY . .
RUN pip install --no-deps . \
 && pip check \
 && tandem --help > /dev/null


FROM ${PYTHON_IMAGE} AS runtime

# libgomp1: llama.cpp's CPU backend uses OpenMP.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 tandem \
 && useradd --system --uid 10001 --gid tandem --home-dir /app --shell /usr/sbin/nologin tandem

COPY --from=builder /opt/venv /opt/venv
# The source tree (minus .dockerignore) as the working directory, so alembic.ini and
# migrations/ are where `tandem db upgrade` looks for them when run from /app.
COPY --from=builder --chown=root:root /src /app

# HOME=/tmp: the deployments run with a read-only root filesystem and a tmpfs / emptyDir on
# /tmp, so anything written under ~ (library caches) lands there.
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TANDEM_API_HOST=0.0.0.0 \
    TANDEM_API_PORT=8000

WORKDIR /app
USER 10001:10001
EXPOSE 8000

# Overridden per service: `tandem db upgrade`, `tandem reconcile`,
# `celery -A workers worker -Q <role>,<role>.batch,<role>.batch-new ...`.
CMD ["tandem", "api"]
