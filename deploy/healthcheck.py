"""Container health probe for the fedslide images (stdlib only, plus grpc for `grpc://` targets).

    python healthcheck.py https://127.0.0.1:9093/health --ca /certs/ca.crt   # SuperLink (TLS, HTTP API)
    python healthcheck.py http://127.0.0.1:9094/health                       # SuperNode's local runtime API
    python healthcheck.py grpc://127.0.0.1:9095                              # SuperExec's gRPC health service

Exit 0 when the target answers healthy, 1 otherwise (the reason goes to stderr). The images copy this
file to /opt/fedslide/healthcheck.py; nothing else of fedslide is needed to run it.
"""

from __future__ import annotations

import argparse
import ssl
import sys
import urllib.request
from collections.abc import Sequence


def check_http(url: str, ca_file: str | None = None, timeout: float = 5.0) -> None:
    """GET `url`; raise unless it answers 2xx. HTTPS is verified against `ca_file` (hostname included)."""
    context = ssl.create_default_context(cafile=ca_file) if url.startswith("https://") else None
    with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
        if not 200 <= response.status < 300:
            raise RuntimeError(f"{url} answered HTTP {response.status}")


def check_grpc(address: str, timeout: float = 5.0) -> None:
    """Ask the standard gRPC health service at `address` (no TLS: it listens on loopback only)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise RuntimeError(f"{address} reports status {reply.status}")


def main(argv: Sequence[str] | None = None) -> int:
    """Probe one target; returns the exit code."""
    parser = argparse.ArgumentParser(description="fedslide container health probe")
    parser.add_argument("target", help="http(s)://HOST:PORT/PATH or grpc://HOST:PORT")
    parser.add_argument("--ca", default=None, help="CA certificate that signed the server's TLS certificate")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    args = parser.parse_args(argv)
    try:
        if args.target.startswith(("http://", "https://")):
            check_http(args.target, args.ca, args.timeout)
        elif args.target.startswith("grpc://"):
            check_grpc(args.target.removeprefix("grpc://"), args.timeout)
        else:
            print(f"unsupported target {args.target!r}: use http://, https:// or grpc://", file=sys.stderr)
            return 2
    except Exception as exc:  # noqa: BLE001 -- refused, TLS, HTTP or gRPC error: any failure means unhealthy
        print(f"unhealthy: {args.target}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
