"""Shared by server and client: configs, MIL models, losses, metrics, feature files, CLI."""

__version__ = "0.1.0"
