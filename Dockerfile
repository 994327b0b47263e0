# syntax=docker/dockerfile:1
# Zen Federation: one image for both commands, `zen-node` (the default) and `zen-bootstrap`.
#
# Build (installs like the Makefile: torch from TORCH_SPEC unless the base already has torch,
# then `pip install .`):
#
#   docker build -t zen-federation .
#   # a small CPU-only image:
#   docker build -t zen-federation --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
#   # a CUDA image: start from a PyTorch CUDA runtime image; its torch is kept, TORCH_SPEC is skipped
#   docker build -t zen-federation:cuda \
#       --build-arg BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime .
#
# Build arguments:
#   BASE_IMAGE       any image with Python >= 3.11 as `python3` (default python:3.11-slim). For a
#                    GPU, a PyTorch CUDA runtime image as above, run with `docker run --gpus all`.
#   TORCH_SPEC       torch requirement installed when the base image has no torch (default
#                    torch==2.13.0); any torch >= 2.2 works.
#   TORCH_INDEX_URL  package index for torch only, e.g. https://download.pytorch.org/whl/cpu
#                    or https://download.pytorch.org/whl/cu126; empty (default) means PyPI.
#
# Volumes: /identity holds keys (a node's PeerID lives there: keep it across restarts) and
# /data holds the corpus and the work folder. The image runs as the unprivileged user `zen`
# (uid 10001); a bind-mounted host folder must be readable (and for /identity writable) by it.
#
# Run a node:
#   docker run --rm -v zen-identity:/identity -v "$PWD/corpus:/data/corpus:ro" zen-federation \
#       join --initial-peers /ip4/203.0.113.5/tcp/31337/p2p/12D3KooW... \
#       --data /data/corpus --identity /identity/node --workdir /data/work
#
# Run a bootstrap peer (publish the libp2p port and, if wanted, the health port):
#   docker run -d --name zen-bootstrap -p 31337:31337 -p 8080:8080 \
#       -v zen-bootstrap-identity:/identity --entrypoint zen-bootstrap zen-federation \
#       --host-maddrs /ip4/0.0.0.0/tcp/31337 --announce-maddrs /ip4/203.0.113.5/tcp/31337 \
#       --identity /identity/bootstrap.id --http-host 0.0.0.0 --http-port 8080
#   docker logs zen-bootstrap          # the multiaddrs to hand to nodes, then joins and leaves
#   curl http://127.0.0.1:8080/healthz
#
# `docker stop` sends SIGTERM: both commands shut down cleanly (no p2pd left behind).

ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/zen \
    PATH=/opt/zen/bin:$PATH

# A virtual environment that still sees the base image's packages, so a base that ships torch
# (the CUDA images) keeps it, as `make` keeps a torch already in .venv.
RUN python3 -m venv --system-site-packages /opt/zen

# torch first, in its own layer: it is by far the largest download and changes least often.
# TORCH_SPEC is pinned (torch==2.13.0) in its ARG, where hadolint cannot see it.
# hadolint ignore=DL3013
RUN if python -c "import torch" 2>/dev/null; then \
        echo "keeping the base image's torch"; \
    elif [ -n "$TORCH_INDEX_URL" ]; then \
        pip install --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"; \
    else \
        pip install "$TORCH_SPEC"; \
    fi

WORKDIR /src
COPY pyproject.toml README.md ./
COPY dht ./dht
COPY node ./node
COPY bootstrap ./bootstrap
RUN pip install . \
    && zen-node --help > /dev/null \
    && zen-bootstrap --help > /dev/null

RUN useradd --create-home --uid 10001 --user-group zen \
    && mkdir -p /data /identity \
    && chown zen:zen /data /identity
VOLUME ["/data", "/identity"]

USER 10001:10001
WORKDIR /data
# 31337: a bootstrap peer's libp2p port (as in the example above); 8080: its /healthz.
EXPOSE 31337 8080

ENTRYPOINT ["zen-node"]
CMD ["--help"]
