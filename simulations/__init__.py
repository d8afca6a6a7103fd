"""Researchers' simulations and experiments: many partners in one process through Flower's simulation engine."""

# Before any script here imports flwr: shared/__init__.py turns Flower's usage telemetry off.
import shared  # noqa: F401
