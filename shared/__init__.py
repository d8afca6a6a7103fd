"""What the coordinator and the partners share: data, encoder, model, training, privacy, the federation's contract."""

import logging
import os

# Flower sends anonymous usage events (its version, the platform, a random id it keeps in
# $FLWR_HOME/source) to telemetry.flower.ai unless FLWR_TELEMETRY_ENABLED is 0, which it reads
# once, when flwr is first imported. A privacy product's processes say nothing to third parties:
# off, unless the user set it.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

# Opacus calls logging.basicConfig when it is imported, which gives the root logger a stderr handler.
# Flower's logger ("flwr") has its own console handler and propagates to the root, so each of its lines
# was printed twice in a run's stream, the second in Opacus' format. Flower's in-process simulation
# turns propagation off for the same reason (set_logger_propagation); this does it for every process.
logging.getLogger("flwr").propagate = False
