# The image the KubeRay manifests name (ghcr.io/driftloop/driftloop:<version in pyproject.toml>):
#   docker build -t ghcr.io/driftloop/driftloop:0.1.0 .
# driftloop installed as `make setup` installs it (the same pyproject.toml pins; the image leaves out the dev extras
# and installs non-editable), CPU-only torch, HAProxy for Serve's HAProxy ingress, running as a non-root user.
# tests/unit/test_cluster_config.py checks these steps against the Makefile and pyproject.toml.
FROM python:3.11-slim-bookworm

# haproxy: Serve's HAProxy ingress (`driftloop serve --ingress haproxy`, `RAY_SERVE_ENABLE_HA_PROXY=1`)
RUN apt-get update && apt-get install -y --no-install-recommends haproxy \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 ray
# the KubeRay manifests' workingDir
WORKDIR /app
COPY --chown=ray:ray pyproject.toml README.md ./
COPY --chown=ray:ray src ./src
COPY --chown=ray:ray configs ./configs
COPY --chown=ray:ray serve_configs ./serve_configs
COPY --chown=ray:ray jobs ./jobs

# torch from PyTorch's CPU index first (the PyPI wheel pulls in CUDA), at the version pyproject.toml pins
RUN pip install --no-cache-dir -U pip \
    && pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
    && pip install --no-cache-dir .

USER ray
ENV RAY_USAGE_STATS_ENABLED=0
