"""Coordinating site: Flower ServerApp, aggregation, server-side distillation, reports."""
