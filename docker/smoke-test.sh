#!/usr/bin/env bash
# The deployment of tests/test_deployment.py, in containers: makes the try-out
# keys (docker/make-keys.sh), builds the image, starts docker/compose.yaml (a
# SuperLink and two SuperNodes, every connection TLS) as its own compose project,
# registers the two partners' keys, checks that a SuperNode with a key nobody
# registered is refused, runs two federations through it from this machine, and
# checks what they left: the first trains both partners, the second is declined
# by both (their privacy accounts, cap 8, are spent), and the coordinator's ledger
# copies verify. Everything it started is removed at the end, volumes included
# (docker/keys stays: compose.yaml's keys for the next try).
#
#   make install && docker/smoke-test.sh
#
# Needs Docker with compose (the v2 plugin or docker-compose 1.x) and port 9095
# free on 127.0.0.1. Data: the demo's generated partners (made here if missing),
# or BOOKS_DATA / GAMES_DATA. TORCH_INDEX is passed to the build if set, and
# DOCKER_BUILD_FLAGS (say, --network host for an index on 127.0.0.1) are added.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=.venv/bin
PROJECT=fedxrec-smoke
if docker compose version >/dev/null 2>&1; then COMPOSE=(docker compose); else COMPOSE=(docker-compose); fi
compose() { "${COMPOSE[@]}" -p "$PROJECT" -f docker/compose.yaml "$@"; }
work=$(mktemp -d)
trap 'compose down -v >/dev/null 2>&1 || true; rm -rf "$work"' EXIT

"$BIN/python" -c "
from pathlib import Path
from shared.federation.scenario import scenario_partners
scenario_partners('synthetic', root=Path('runs/_data'), n_partners=3)"
docker/make-keys.sh books games stranger
# shellcheck disable=SC2086  # DOCKER_BUILD_FLAGS: several flags
docker build ${DOCKER_BUILD_FLAGS:-} ${TORCH_INDEX:+--build-arg "TORCH_INDEX=$TORCH_INDEX"} -f docker/Dockerfile -t fedxrec .
compose up -d superlink
for _ in $(seq 60); do
    if curl -fs --cacert docker/keys/ca.pem https://127.0.0.1:9095/health >/dev/null; then break; fi
    sleep 1
done

export FLWR_HOME="$work/flwr" FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_TELEMETRY_ENABLED=0
mkdir "$FLWR_HOME"
printf '[superlink]\ndefault = "partners"\n\n[superlink.partners]\naddress = "127.0.0.1:9095"\nroot-certificates = "%s"\n' \
    "$PWD/docker/keys/ca.pem" >"$FLWR_HOME/config.toml"
for partner in books games; do
    "$BIN/flwr" supernode register "docker/keys/$partner.pub" partners | tee -a "$work/register.log"
done
grep -c "registered successfully" "$work/register.log" | grep -qx 2 || { echo "registering the partners' keys failed"; exit 1; }
compose up -d
# A SuperNode whose key was never registered, on the same network, with the same CA: refused (Flower's
# exit code 305, which it prints; the process itself exits 1)
if docker run --rm --network "${PROJECT}_default" -v "$PWD/docker/keys/ca.pem:/keys/ca.pem:ro" \
    -v "$PWD/docker/keys/stranger:/keys/stranger:ro" fedxrec flower-supernode --root-certificates=/keys/ca.pem \
    --auth-supernode-private-key=/keys/stranger --superlink=superlink:9095 --node-config="data-path='/tmp'" \
    >"$work/stranger.log" 2>&1 || ! grep -q "Exit Code: 305" "$work/stranger.log"; then
    tail -20 "$work/stranger.log"
    echo "a SuperNode whose key nobody registered was not refused with Flower's exit code 305"
    exit 1
fi
echo "a SuperNode whose key nobody registered was refused (Flower's exit code 305)"

for run in first second; do
    "$BIN/flwr" run . partners --stream --run-config "rounds=2 run-id=\"smoke-$run\"" >"$work/$run.log" 2>&1 ||
        { tail -50 "$work/$run.log"; exit 1; }
    docker cp "$(compose ps -q superlink):/var/lib/fedxrec/runs/smoke-$run" "$work/"
done

"$BIN/fedxrec" privacy report "$work/smoke-first" --out "$work/report"
"$BIN/python" - "$work" <<'EOF'
import json, sys
from pathlib import Path

work = Path(sys.argv[1])
first = json.loads((work / "smoke-first" / "summary.json").read_text())["partners"]
second = json.loads((work / "smoke-second" / "summary.json").read_text())["partners"]
report = json.loads((work / "report" / "report.json").read_text())
problems = []
if sorted(first) != ["books", "games"] or sorted(second) != ["books", "games"]:
    problems.append(f"partners {sorted(first)} and {sorted(second)}, expected books and games in both runs")
problems += [f"first run: {n} trained {p['rounds_trained']} of 2 rounds" for n, p in first.items() if p["rounds_trained"] != 2]
problems += [f"second run: {n} declined {p['rounds_declined']} of 2 rounds" for n, p in second.items() if p["rounds_declined"] != 2]
if not (report["verified"] and report["anchored"]):
    problems.append(f"the first run's ledgers do not verify: {[p['problems'] for p in report['partners']]}")
for name, p in first.items():
    print(f"{name}: first run test NDCG@10 {p['test_ndcg@10']:.4f}, epsilon {p['epsilon']:.3f}; second run declined {second[name]['rounds_declined']}")
if problems:
    sys.exit("docker smoke test failed:\n  " + "\n  ".join(problems))
print("docker smoke test passed")
EOF
