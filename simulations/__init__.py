"""Researchers' simulations and experiments: many partners in one process through Flower's simulation engine."""

import os

# Flower sends anonymous usage events (its version, the platform, a random id it keeps in
# $FLWR_HOME/source) to telemetry.flower.ai unless FLWR_TELEMETRY_ENABLED is 0, which it reads
# once, when flwr is first imported. A privacy product's processes say nothing to third parties:
# off, unless the user set it.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
