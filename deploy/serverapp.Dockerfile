# fedslide coordinating site: the ServerApp runtime (Flower SuperExec with fedslide and CPU torch installed).
#
# Build from the repository root:  docker build -f deploy/serverapp.Dockerfile -t fedslide/serverapp:0.1.0 .
#
# The SuperLink runs with `--isolation process`, so it starts no ServerApp itself: this container's
# `flower-superexec` polls the SuperLink's Runtime API (HTTPS, verified against /certs/ca.crt), authenticates
# with the shared secret and runs each ServerApp in a subprocess. The SuperLink never installs dependencies
# (`--disable-runtime-dependency-installation`), so everything the ServerApp imports is installed here.
#
# Mounts: /certs/ca.crt and /secrets/superexec.secret read-only; /data/runs writable (ServerApp outputs:
# start runs with the run config runs-dir="/data/runs", e.g. flwr run . fedslide -c 'runs-dir="/data/runs"').
FROM flwr/superexec:1.42.0-py3.11-ubuntu24.04

LABEL org.opencontainers.image.title="fedslide-serverapp" \
      org.opencontainers.image.description="Flower SuperExec running the fedslide ServerApp (CPU)" \
      org.opencontainers.image.licenses="Apache-2.0"

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY --chmod=0644 deploy/healthcheck.py /opt/fedslide/healthcheck.py

# Installed as root and left owned by root (files not writable by UID 49999), so code that runs in the
# container (e.g. a submitted app bundle) cannot change the installed packages; the container runs as 49999.
USER 0
WORKDIR /opt/fedslide-src
COPY pyproject.toml README.md ./
COPY common ./common
COPY client ./client
COPY server ./server
COPY deploy ./deploy
COPY configs ./configs
# CPU-only torch first (the PyPI default pulls CUDA libraries), then the project (flwr stays at the
# image's version, the one pyproject pins); then the whole Python environment is made root's and read-only to others.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && pip install --no-cache-dir . "flwr==1.42.0" "torch==${TORCH_VERSION}" \
    && chown -R root:root "$(python -c 'import sys; print(sys.prefix)')" \
    && chmod -R go-w "$(python -c 'import sys; print(sys.prefix)')" \
    && rm -rf /opt/fedslide-src
USER 49999
WORKDIR /app

HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "/opt/fedslide/healthcheck.py", "grpc://127.0.0.1:9095"]

ENTRYPOINT ["flower-superexec"]
CMD ["--runtime-api-address", "superlink:9093", \
     "--root-certificates", "/certs/ca.crt", \
     "--superexec-auth-secret-file", "/secrets/superexec.secret", \
     "--health-server-address", "127.0.0.1:9095"]
