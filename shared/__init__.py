"""What the coordinator and the partners share: data, encoder, model, training, privacy, the federation's contract."""

import os

# Flower sends anonymous usage events (its version, the platform, a random id it keeps in
# $FLWR_HOME/source) to telemetry.flower.ai unless FLWR_TELEMETRY_ENABLED is 0, which it reads
# once, when flwr is first imported. A privacy product's processes say nothing to third parties:
# off, unless the user set it.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
