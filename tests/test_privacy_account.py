"""A partner's privacy account across runs, and a partner's node config."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from shared.cli import main
from shared.federation.scenario import load_scenario, partner_from_node_config
from shared.privacy import account, independent
from shared.privacy.accounting import Budget, best_order, epsilon_of, release_fits
from shared.privacy.ledger import GENESIS

DELTA = 1e-5


def dp_sgd(sigma: float = 1.0, rate: float = 0.02, steps: int = 100) -> dict[str, object]:
    return {"mechanism": "dp-sgd", "noise_multiplier": sigma, "sample_rate": rate, "steps": steps, "max_grad_norm": 1.0}


def test_reservations_compose_over_runs_and_stop_at_the_cap(tmp_path: Path) -> None:
    path = tmp_path / "account.jsonl"
    granted = {}
    for run in ("run-a", "run-b", "run-c"):
        for r in (1, 2, 3):
            got = account.reserve(path, run=run, server_round=r, events=[dp_sgd()], cap=4.0, delta=DELTA, plan=[(1.0, 0.02, 300)])
            granted[run, r] = got.granted
    entries = account.read(path)
    order = best_order([(1.0, 0.02, 300)], delta=DELTA)  # the first run's whole plan fixes the account's order
    assert [x["order"] for x in entries] == [order] * len(entries)
    k = len(entries)  # RDP at that order over every run's rounds: k rounds fit in 4, one more would not
    assert 3 < k < 9 and list(granted.values()) == [True] * k + [False] * (9 - k)
    assert [(x["run"], x["round"]) for x in entries] == [key for key, ok in granted.items() if ok]
    assert entries[-1]["epsilon"] == pytest.approx(epsilon_of([(1.0, 0.02, 100 * k)], delta=DELTA, accountant="rdp", order=order))
    assert entries[-1]["epsilon"] <= 4.0 < epsilon_of([(1.0, 0.02, 100 * (k + 1))], delta=DELTA, accountant="rdp", order=order)
    # the first run alone is counted as its own accountant counts it; the runs after it at no better than their best order
    assert entries[2]["epsilon"] == pytest.approx(epsilon_of([(1.0, 0.02, 300)], delta=DELTA, accountant="rdp"))
    assert entries[-1]["epsilon"] >= epsilon_of([(1.0, 0.02, 100 * k)], delta=DELTA, accountant="rdp")
    # recomputed without Opacus, at the account's order: the same figure
    assert account.summary(path)["independent_epsilon"]["integrated_rdp"] == pytest.approx(entries[-1]["epsilon"], rel=1e-6)


def test_the_account_command_warns_when_the_integral_does_not_back_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same check as the run report's: the lifetime epsilon must equal its recomputation by integration."""
    path = tmp_path / "account.jsonl"
    account.reserve(path, run="a", server_round=1, events=[dp_sgd()], cap=8.0, delta=DELTA)
    assert main(["privacy", "account", str(path)]) == 0
    assert "WARNING" not in capsys.readouterr().out
    recorded = account.read(path)[-1]["epsilon"]
    integrated = independent.integrated_epsilon
    monkeypatch.setattr(independent, "integrated_epsilon", lambda events, **kw: integrated(events, **kw) + 0.01)  # as if Opacus erred
    assert main(["privacy", "account", str(path)]) == 0  # the account's own checks still pass: it is a warning
    assert f"WARNING: integrated RDP epsilon {recorded + 0.01:.6f} DIFFERS from the account's {recorded:.6f}" in capsys.readouterr().out


def test_the_account_keeps_its_first_delta_and_order(tmp_path: Path) -> None:
    path = tmp_path / "account.jsonl"
    account.reserve(path, run="a", server_round=1, events=[dp_sgd()], cap=None, delta=DELTA)
    got = account.reserve(path, run="b", server_round=1, events=[dp_sgd(sigma=3.0)], cap=None, delta=1e-3, plan=[(3.0, 0.02, 100)])
    assert got.granted  # no cap: recorded, never refused
    order = best_order([(1.0, 0.02, 100)], delta=DELTA)  # without a plan: the first reservation's own events
    expected = epsilon_of([(1.0, 0.02, 100), (3.0, 0.02, 100)], delta=DELTA, accountant="rdp", order=order)
    assert got.after == pytest.approx(expected)
    assert [(x["delta"], x["accountant"], x["order"]) for x in account.read(path)] == [(DELTA, "rdp", order)] * 2


def test_an_account_written_before_orders_were_fixed_still_counts_and_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Lines without "order" (an earlier fedxrec's): read, verified and extended as they were, at the best order."""
    path = tmp_path / "account.jsonl"
    epsilon = epsilon_of([(1.0, 0.02, 100)], delta=DELTA, accountant="prv")
    old = {"seq": 1, "run": "a", "round": 1, "accountant": "prv", "delta": DELTA, "cap": 8.0, "events": [dp_sgd()]}
    line = json.dumps({**old, "epsilon": epsilon, "time": "2026-11-01T10:00:00+0000", "prev": GENESIS}, separators=(", ", ": "))
    path.write_text(line + "\n")
    got = account.reserve(path, run="b", server_round=1, events=[dp_sgd()], cap=8.0, delta=DELTA)
    assert got.granted and got.after == pytest.approx(epsilon_of([(1.0, 0.02, 200)], delta=DELTA, accountant="prv"))
    assert ["order" in x for x in account.read(path)] == [False, False]
    assert main(["privacy", "account", str(path)]) == 0
    assert "prv at its best order (an account written before orders were fixed: not a proven cap over runs)" in capsys.readouterr().out
    second = json.loads(path.read_text().splitlines()[1])
    path.write_text(line + "\n" + json.dumps({**second, "order": 4.0}) + "\n")  # one line's form differs from the first's
    with pytest.raises(account.AccountError, match="line 2: expected the fields"):
        account.read(path)


def test_an_edited_removed_or_truncated_account_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "account.jsonl"
    for r in (1, 2, 3):
        account.reserve(path, run="a", server_round=r, events=[dp_sgd()], cap=8.0, delta=DELTA)
    assert main(["privacy", "account", str(path)]) == 0
    out = capsys.readouterr().out
    assert "lifetime epsilon" in out and "of cap 8" in out and "dp-accounting RDP" in out
    head = out.split("head: ")[1].split()[0]
    lines = path.read_text().splitlines()

    edited = json.loads(lines[1])
    edited["events"][0]["noise_multiplier"] = 2.0  # a smaller spend, claimed afterwards
    path.write_text("\n".join([lines[0], json.dumps(edited, separators=(", ", ": ")), lines[2]]) + "\n")
    assert main(["privacy", "account", str(path)]) == 1
    assert "line 3: prev is not the hash" in capsys.readouterr().out

    path.write_text("\n".join([lines[0], lines[2]]) + "\n")
    assert main(["privacy", "account", str(path)]) == 1
    assert "line 2: seq is 3, expected 2" in capsys.readouterr().out

    path.write_text("\n".join(lines[:2]) + "\n")  # cut at the end: only the recorded head shows it
    assert main(["privacy", "account", str(path)]) == 0
    assert main(["privacy", "account", str(path), "--head", head]) == 1
    assert "lines were removed at the end" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("epsilon", float("nan"), "epsilon nan: expected a finite number of at least 0"),
        ("cap", "eight", "cap 'eight': expected null (no cap) or a finite number above 0"),
        ("run", 3, "run 3: expected the run's id (text)"),
        ("delta", 2.0, "delta 2.0: expected 0 < delta < 1"),
    ],
)
def test_a_damaged_account_field_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], field: str, value: object, words: str
) -> None:
    path = tmp_path / "account.jsonl"
    account.reserve(path, run="a", server_round=1, events=[dp_sgd()], cap=8.0, delta=DELTA)
    entry = json.loads(path.read_text())
    path.write_text(json.dumps({**entry, field: value}) + "\n")
    assert main(["privacy", "account", str(path)]) == 1
    assert f"{path}, line 1: {words}" in capsys.readouterr().out
    with pytest.raises(account.AccountError, match="line 1: " + words.split(":")[0]):  # and no round reserves on it
        account.reserve(path, run="b", server_round=1, events=[dp_sgd()], cap=8.0, delta=DELTA)


def _reserve_many(path: str, run: str) -> int:
    granted = 0
    for r in range(1, 6):
        got = account.reserve(Path(path), run=run, server_round=r, events=[dp_sgd()], cap=5.0, delta=DELTA)
        granted += got.granted
    return granted


def test_runs_reserving_at_once_never_pass_the_cap_together(tmp_path: Path) -> None:
    path = tmp_path / "account.jsonl"
    with multiprocessing.get_context("fork").Pool(4) as pool:
        granted = pool.starmap(_reserve_many, [(str(path), f"run-{i}") for i in range(4)])
    entries = account.read(path)  # one intact chain, every granted round on it
    assert len(entries) == sum(granted)
    assert entries[-1]["epsilon"] <= 5.0
    order = entries[0]["order"]
    assert epsilon_of([(1.0, 0.02, 100)] * (len(entries) + 1), delta=DELTA, accountant="rdp", order=order) > 5.0


def test_an_item_count_release_fits_what_earlier_runs_left() -> None:
    budget = Budget(8.0, DELTA)
    assert release_fits(budget=budget, counts_noise=3.0)
    heavy = [(0.6, 0.01, 2000)]  # earlier runs took most of the 8
    assert epsilon_of(heavy, delta=DELTA, accountant="rdp") > 6
    assert not release_fits(budget=budget, counts_noise=3.0, spent=heavy)


def test_node_config_errors_name_every_key() -> None:
    with pytest.raises(ValueError) as info:
        partner_from_node_config(
            {
                "data-path": "/data/shop",
                "max-epsilom": 4.0,
                "max-users": 0,
                "public-users": 4000.5,
                "data-format": "csv",
                "max-delta": float("nan"),
            }
        )
    with pytest.raises(ValueError, match="max-epsilon must be a finite number above 0, got inf"):
        partner_from_node_config({"data-path": "/data/shop", "state-dir": "/keep", "max-epsilon": float("inf")})
    message = str(info.value)
    assert "unknown key 'max-epsilom'; did you mean 'max-epsilon'?" in message  # a cap must never be dropped silently
    assert "max-users must be a whole number of at least 1, got 0" in message
    assert "public-users must be a whole number of at least 1, got 4000.5" in message
    assert "data-format must be one of ['tsv', 'recbole', 'json', 'mapped'], got 'csv'" in message
    assert "max-delta must be a number in (0, 1), got nan" in message
    # without a state-dir the state would go where the coordinator's runs-dir says
    assert "state-dir must be the partner's private folder" in message
    with pytest.raises(ValueError, match="data-path must be the partner's data folder"):
        partner_from_node_config({"max-epsilon": 4.0, "state-dir": "/keep"})
    spec = partner_from_node_config({"data-path": "/data/shop", "state-dir": "/keep", "max-epsilon": 4, "public-users": 4000})
    assert (spec.name, spec.max_epsilon, spec.account) == ("shop", 4.0, Path("/keep/privacy-account.jsonl"))
    assert spec.public_users == 4000
    shared = partner_from_node_config({"data-path": "/data/shop", "state-dir": "/keep", "privacy-account": "/accounts/shop.jsonl"})
    assert shared.account == Path("/accounts/shop.jsonl")
    # a string would read as true whatever it says: only a TOML boolean is taken
    with pytest.raises(ValueError, match="withhold-metrics must be true or false, got 'false'"):
        partner_from_node_config({"data-path": "/data/shop", "state-dir": "/keep", "withhold-metrics": "false"})
    assert partner_from_node_config({"data-path": "/data/shop", "state-dir": "/keep", "withhold-metrics": True}).withhold_metrics
    assert not spec.withhold_metrics


def test_scenario_partner_settings_are_checked(tmp_path: Path) -> None:
    (tmp_path / "shop").mkdir()
    path = tmp_path / "scenario.toml"
    path.write_text('[[partner]]\ndata = "shop"\nmax-epsilon = "eight"\nprivacy-acount = "a.jsonl"\n')
    with pytest.raises(ValueError) as info:
        load_scenario(path)
    assert "max-epsilon must be a finite number above 0, got 'eight'" in str(info.value)
    assert "unknown key 'privacy-acount'; did you mean 'privacy-account'?" in str(info.value)
    path.write_text('[[partner]]\ndata = "shop"\nmax-epsilon = 3\nprivacy-account = "accounts/shop.jsonl"\n')
    (spec,) = load_scenario(path)
    assert spec.max_epsilon == 3.0 and spec.account == tmp_path / "accounts" / "shop.jsonl"
