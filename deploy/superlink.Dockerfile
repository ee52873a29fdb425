# fedslide coordinating site: the Flower SuperLink.
#
# Build from the repository root:  docker build -f deploy/superlink.Dockerfile -t fedslide/superlink:0.1.0 .
#
# Flower 1.41 serves the Fleet, Control and Runtime (ServerAppIo) APIs on ONE HTTPS port (here 9093). The
# Control API is not authenticated in open-source Flower: publish this port on 127.0.0.1 only and let the
# hospitals in through the Fleet proxy (deploy/fleet-proxy.Dockerfile), which forwards /v1/fleet/ and nothing
# else. ServerApps run in a separate container (--isolation process; deploy/serverapp.Dockerfile) that
# authenticates with the shared secret in /secrets/superexec.secret.
#
# Mounts (all read-only except /state):
#   /certs/ca.crt, /certs/server.pem, /certs/server.key   from `fedslide certs` (server.pem SANs must include
#                                                          127.0.0.1 and the name "superlink")
#   /secrets/superexec.secret                              shared with the serverapp container
#   /app/state                                             writable: the SuperLink database (registered nodes,
#                                                          runs); keep it across updates
FROM flwr/superlink:1.42.0

LABEL org.opencontainers.image.title="fedslide-superlink" \
      org.opencontainers.image.description="Flower SuperLink for fedslide: TLS, SuperNode authentication, process isolation" \
      org.opencontainers.image.licenses="Apache-2.0"

# No calls home from the coordinating site: Flower telemetry and update checks off.
ENV FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1

COPY --chmod=0644 deploy/healthcheck.py /opt/fedslide/healthcheck.py
# 49999 is the unprivileged `app` user of Flower's images (home /app). /app/state belongs to it, so a named
# volume mounted there starts out writable.
USER 49999
RUN mkdir -m 0700 /app/state

EXPOSE 9093
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["python", "/opt/fedslide/healthcheck.py", "https://127.0.0.1:9093/health", "--ca", "/certs/ca.crt"]

ENTRYPOINT ["flower-superlink"]
CMD ["--ssl-ca-certfile", "/certs/ca.crt", \
     "--ssl-certfile", "/certs/server.pem", \
     "--ssl-keyfile", "/certs/server.key", \
     "--enable-supernode-auth", \
     "--database", "/app/state/superlink.db", \
     "--disable-runtime-dependency-installation", \
     "--isolation", "process", \
     "--superexec-auth-secret-file", "/secrets/superexec.secret", \
     "--host", "0.0.0.0", \
     "--port", "9093"]
