"""Deployment tooling: TLS/authentication material, container specs."""
