# fedslide coordinating site: the Fleet proxy, the only endpoint published to the hospitals (port 9092).
#
# Build from the repository root:  docker build -f deploy/fleet-proxy.Dockerfile -t fedslide/fleet-proxy:0.1.0 .
#
# nginx (unprivileged image) terminating TLS with the SuperLink's certificate and forwarding only the Flower
# Fleet API (/v1/fleet/) to the SuperLink at superlink:9093; the unauthenticated Control API and the Runtime
# API are answered 403. See deploy/fleet-proxy.conf.
#
# Mounts (read-only): /certs/ca.crt, /certs/server.pem, /certs/server.key (readable by UID 101).
FROM nginxinc/nginx-unprivileged:1.28.0-alpine

LABEL org.opencontainers.image.title="fedslide-fleet-proxy" \
      org.opencontainers.image.description="Forwards only the Flower Fleet API to the fedslide SuperLink" \
      org.opencontainers.image.licenses="Apache-2.0"

COPY --chmod=0644 deploy/fleet-proxy.conf /etc/nginx/conf.d/default.conf

# 101 is the unprivileged `nginx` user of the base image.
USER 101

EXPOSE 9092
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["wget", "-q", "-O", "/dev/null", "http://127.0.0.1:8081/healthz"]
