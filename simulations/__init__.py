"""Researchers' simulations and experiments: many partners on one machine through Flower's simulation engine (``flwr run``)."""

# Before any script here imports flwr: shared/__init__.py turns Flower's usage telemetry off.
import shared  # noqa: F401
