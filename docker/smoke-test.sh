#!/usr/bin/env bash
# The deployment of tests/test_deployment.py, in containers: builds the image,
# starts docker/compose.yaml (a SuperLink and two SuperNodes) as its own compose
# project, runs two federations through it from this machine, and checks what
# they left: the first trains both partners, the second is declined by both
# (their privacy accounts, cap 8, are spent), and the coordinator's ledger copies
# verify. Everything it started is removed at the end, volumes included.
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
# shellcheck disable=SC2086  # DOCKER_BUILD_FLAGS: several flags
docker build ${DOCKER_BUILD_FLAGS:-} ${TORCH_INDEX:+--build-arg "TORCH_INDEX=$TORCH_INDEX"} -f docker/Dockerfile -t fedxrec .
compose up -d
for _ in $(seq 60); do
    if curl -fs http://127.0.0.1:9095/health >/dev/null; then break; fi
    sleep 1
done

mkdir "$work/flwr"
printf '[superlink]\ndefault = "partners"\n\n[superlink.partners]\naddress = "127.0.0.1:9095"\ninsecure = true\n' >"$work/flwr/config.toml"
for run in first second; do
    FLWR_HOME="$work/flwr" FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
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
