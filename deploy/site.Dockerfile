# fedslide hospital site: a Flower SuperNode with the fedslide ClientApp's dependencies (CPU torch, OpenSlide,
# h5py) installed.
#
# Build from the repository root:  docker build -f deploy/site.Dockerfile -t fedslide/site:0.1.0 .
#
# The SuperNode connects OUT to the coordinating site's Fleet endpoint over TLS (verified against
# /certs/ca.crt) and authenticates with the site's private key; it opens no port to the outside. It is Flower's
# SuperNode started through `fedslide-supernode` (client/supernode.py): polls of 0.2 s instead of 3 s, and in
# Flower's default `--isolation subprocess` it starts fedslide's warm SuperExec (client/superexec.py) inside this
# container instead of `flower-superexec`: each message runs in a process forked from one that imported torch
# once, and the site-dir's feature files are held in memory (up to --feature-memory-gb, default 8 GiB; size the
# container's memory for it). No second container and no extra internal port are needed. `--superexec flower`
# restores Flower's own SuperExec (a fresh flwr-clientapp per message). Runtime dependency installation stays
# off (Flower's default for SuperNodes): only what is installed here runs.
#
# Mounts (see deploy/README.md):
#   /data/site        read-only   the site directory: slides/, labels.csv, features/, qc/
#   /data/site/runs   writable    run outputs, including runs/<run_id>/egress.jsonl (the audit log)
#   /certs/ca.crt     read-only   the federation's CA certificate
#   /keys/site.key    read-only   this site's private key (readable by UID 49999)
#
# Usage: docker run ... fedslide/site:0.1.0 --superlink fl.coordinator.example.org:9092 \
#          --root-certificates /certs/ca.crt --auth-supernode-private-key /keys/site.key \
#          --node-config 'site-dir="/data/site" site-name="site1"'
FROM flwr/supernode:1.42.0-py3.11-ubuntu24.04

LABEL org.opencontainers.image.title="fedslide-site" \
      org.opencontainers.image.description="Flower SuperNode with the fedslide ClientApp dependencies (CPU)" \
      org.opencontainers.image.licenses="Apache-2.0"

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# Nothing leaves the site except through the SuperLink connection: Flower telemetry and update checks off.
# With `--superexec flower`, Flower's SuperExec looks for the next task every 0.2 s instead of 1 s.
ENV FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.2 \
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
# CPU-only torch first (the PyPI default pulls CUDA libraries), then the project (openslide-bin and h5py; flwr stays at the
# image's version, the one pyproject pins); then the whole Python environment is made root's and read-only to others.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && pip install --no-cache-dir . "flwr==1.42.0" "torch==${TORCH_VERSION}" \
    && chown -R root:root "$(python -c 'import sys; print(sys.prefix)')" \
    && chmod -R go-w "$(python -c 'import sys; print(sys.prefix)')" \
    && rm -rf /opt/fedslide-src
USER 49999
WORKDIR /app

# Liveness of the SuperNode process (its runtime API on loopback); whether it reached the SuperLink shows in
# its log and in `flwr supernode list` at the coordinating site.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "/opt/fedslide/healthcheck.py", "http://127.0.0.1:9094/health"]

ENTRYPOINT ["fedslide-supernode"]
CMD ["--root-certificates", "/certs/ca.crt", \
     "--auth-supernode-private-key", "/keys/site.key", \
     "--node-config", "site-dir=\"/data/site\""]
