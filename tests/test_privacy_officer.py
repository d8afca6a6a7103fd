"""Privacy planning, the hash-chained ledger, its verification, and the officer's report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from shared.cli import main as cli_main
from shared.privacy import account, independent, ledger
from shared.privacy.accounting import epsilon_of, plan
from shared.privacy.report import build_report, integration_warning, to_markdown
from tests.browser import assert_page_shows_every_partner

# --------------------------------------------------------------------------- accounting against dp-accounting


def random_history(rng: np.random.Generator) -> list[tuple[float, float, int]]:
    return [
        (float(rng.uniform(0.8, 4.0)), float(10 ** rng.uniform(-4, -1)), int(rng.integers(1, 3000))) for _ in range(int(rng.integers(1, 6)))
    ]


def test_our_rdp_epsilon_equals_dp_accounting_within_one_percent() -> None:
    """200 random histories of 1-5 events with epsilon up to 20 (the range budgets live in).

    Beyond it, at low noise and high sample rates, dp-accounting's figure is a few
    percent higher: at fractional orders it sums the series by the terms' magnitudes
    (next test), and drops an order where that sum does not converge in 1,000 terms.
    """
    rng = np.random.default_rng(7)
    checked = 0
    while checked < 200:
        events = random_history(rng)
        delta = float(10 ** rng.uniform(-7, -3))
        ours = epsilon_of(events, delta=delta, accountant="rdp")
        if ours > 20:
            continue
        theirs = independent.rdp_epsilon(events, delta=delta)
        assert ours == pytest.approx(theirs, rel=0.01), (events, delta)
        checked += 1


def test_integrated_rdp_equals_opacus_to_rounding() -> None:
    """Direct integration of the RDP definition against Opacus' series, over random histories
    (item-count releases at sample rate 1 among them), at the best order and at a fixed one."""
    rng = np.random.default_rng(11)
    checked = 0
    while checked < 40:
        events = random_history(rng) + ([(3.0, 1.0, 1)] if rng.random() < 0.3 else [])
        delta = float(10 ** rng.uniform(-7, -3))
        ours = epsilon_of(events, delta=delta, accountant="rdp")
        if not 0.05 < ours < 50:
            continue
        assert independent.integrated_epsilon(events, delta=delta) == pytest.approx(ours, rel=1e-9), (events, delta)
        checked += 1
    fixed = epsilon_of([(0.8, 0.3, 40)], delta=1e-5, accountant="rdp", order=5.5)
    assert independent.integrated_epsilon([(0.8, 0.3, 40)], delta=1e-5, order=5.5) == pytest.approx(fixed, rel=1e-9)


def test_dp_accounting_is_above_the_integral_at_fractional_orders_only() -> None:
    """What the report says of dp-accounting's RDP figure, on ``make demo``'s partners' events: at
    integer orders it equals the integral; at fractional ones it is higher (the series summed by
    the terms' magnitudes), and its best order is fractional, so its epsilon is a little higher."""
    from dp_accounting.rdp import RdpAccountant

    events, delta = [(0.7512, 0.1429, 21), (3.0, 1.0, 1)], 2.5e-4

    def dp_accounting_at(order: float) -> float:
        accountant = RdpAccountant(orders=[order])
        accountant.compose(independent._dp_event(events))
        return float(accountant.get_epsilon(delta))

    for order in (2.0, 3.0, 5.0):
        assert dp_accounting_at(order) == pytest.approx(independent.integrated_epsilon(events, delta=delta, order=order), rel=1e-9)
    for order in (2.4, 2.6, 3.5):
        assert dp_accounting_at(order) > independent.integrated_epsilon(events, delta=delta, order=order) + 1e-4
    ours = epsilon_of(events, delta=delta, accountant="rdp")
    assert independent.integrated_epsilon(events, delta=delta) == pytest.approx(ours, rel=1e-9)
    assert 1.001 * ours < independent.rdp_epsilon(events, delta=delta) < 1.01 * ours


def test_the_report_says_when_the_integral_does_not_back_the_ledger() -> None:
    def partner(accountant: str, recorded: float, integrated: float) -> dict[str, object]:
        return {"accountant": accountant, "epsilon": recorded, "independent_epsilon": {"integrated_rdp": integrated}}

    assert integration_warning(partner("rdp", 2.0, 2.0 + 1e-9), whose="ledger") == ""
    assert "DIFFERS from the ledger's 2.000000" in integration_warning(partner("rdp", 2.0, 2.01), whose="ledger")
    assert integration_warning(partner("prv", 2.0, 2.3), whose="ledger") == ""  # PRV's figure is not RDP's
    life = {"accountant": "rdp", "epsilon": 5.0, "independent_epsilon": {"integrated_rdp": 5.1}}
    assert "DIFFERS from the account's 5.000000" in integration_warning(life, whose="account")
    assert integration_warning({**life, "independent_epsilon": {"integrated_rdp": 5.0}}, whose="account") == ""


def test_pld_is_no_looser_than_rdp() -> None:
    events = [(0.6, 1 / 132, 792)]
    assert independent.pld_epsilon(events, delta=1e-5) < independent.rdp_epsilon(events, delta=1e-5)


def test_plan_never_overshoots_the_target() -> None:
    """Each accountant's own multiplier spends at most the target, and no less than 97 % of it."""
    rng = np.random.default_rng(3)
    for _ in range(12):
        target = float(rng.uniform(0.5, 10))
        rate, steps = float(10 ** rng.uniform(-3, -1)), int(rng.integers(50, 2000))
        p = plan(epsilon=target, delta=1e-5, sample_rate=rate, steps=steps, accountant="prv")  # calibrates both accountants
        spent = {a: epsilon_of([(sigma, rate, steps)], delta=1e-5, accountant=a) for a, sigma in p.multipliers.items()}
        assert all(0.97 * target <= e <= target for e in spent.values()), (target, rate, steps, spent)
        assert p.noise_multiplier == p.multipliers["prv"] and p.epsilon == p.per_round["prv"][-1]
        assert p.epsilon == pytest.approx(spent["prv"])


def test_plan_command_json_and_per_round(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        cli_main(
            ["privacy", "plan", "--epsilon", "8", "--users", "8442", "--batch-size", "64", "--rounds", "3", "--local-epochs", "2", "--json"]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert {"noise_multiplier", "epsilon", "delta", "sample_rate", "steps", "accountant"} <= set(out)
    assert out["steps"] == 3 * 2 * 132 and out["sample_rate"] == pytest.approx(1 / 132) and out["delta"] == pytest.approx(1 / 84420)
    assert out["epsilon"] <= 8 and out["epsilon_per_round"]["rdp"][-1] == pytest.approx(out["epsilon"])
    rdp, prv = out["epsilon_per_round"]["rdp"], out["epsilon_per_round"]["prv"]
    assert rdp == sorted(rdp) and all(p < r for p, r in zip(prv, rdp, strict=True))  # PRV is the tighter analysis

    assert (
        cli_main(
            ["privacy", "plan", "--epsilon", "3", "--delta", "1e-5", "--sample-rate", "0.01", "--steps", "1000", "--accountant", "prv"]
        )
        == 0
    )
    assert "noise multiplier (prv)" in capsys.readouterr().out


def test_plan_command_names_every_bad_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["privacy", "plan", "--epsilon", "-1", "--steps", "10", "--users", "5"]) != 0
    err = capsys.readouterr().err
    for expected in (
        "either --sample-rate",
        "--sample-rate and --steps go together",
        "--batch-size and --local-epochs",
        "--epsilon must be > 0",
    ):
        assert expected in err, err
    assert err.startswith("fedxrec privacy: error: 4 problems with the flags:\n  give either --sample-rate"), err  # one per line


# --------------------------------------------------------------------------- the ledger


def write_ledger(path: Path, *, partner: str = "books", rounds: int = 4, decline_last: bool = True, again: int | None = None) -> list[str]:
    """A partner's ledger of ``rounds`` rounds; ``again``: a round run twice, as after the coordinator resumed."""
    events: list[tuple[float, float, int]] = []
    lines = []
    for r in sorted([*range(1, rounds + 1), *([again] if again else [])]):
        declined = decline_last and r == rounds
        event = (
            [] if declined else [{"mechanism": "dp-sgd", "noise_multiplier": 0.9, "sample_rate": 0.02, "steps": 100, "max_grad_norm": 1.0}]
        )
        events += [(0.9, 0.02, 100)] * len(event)
        if r == 1:  # a partner's first round also releases the popularity prior's item counts
            event.insert(0, {"mechanism": "item counts", "noise_multiplier": 5.0, "sample_rate": 1.0, "steps": 1, "max_grad_norm": 1.0})
            events.insert(0, (5.0, 1.0, 1))
        entry = ledger.make_entry(
            round=r,
            partner=partner,
            status="declined" if declined else "trained",
            accountant="rdp",
            delta=1e-5,
            budget_epsilon=4.0,
            events=event,
            epsilon=epsilon_of(events, delta=1e-5, accountant="rdp"),
            examples=0 if declined else 200,
            note="declined: over budget" if declined else "",
        )
        lines.append(ledger.append(path, entry))
    return lines


def test_an_untouched_ledger_verifies(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    lines = write_ledger(path)
    result = ledger.verify(path, head=ledger.head_of(path))
    assert result.ok and result.lines == 4 and result.head == ledger.line_hash(lines[-1])
    assert result.epsilon == pytest.approx(json.loads(lines[-1])["epsilon"])
    assert [e["seq"] for e in result.entries] == [1, 2, 3, 4] and json.loads(lines[0])["prev"] == ledger.GENESIS


def test_verify_rejects_an_event_of_unknown_mechanism(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    lines = write_ledger(path, rounds=1, decline_last=False)
    entry = json.loads(lines[0])
    entry["events"][0]["mechanism"] = "laplace"
    _rewrite(path, [json.dumps(entry)])
    result = ledger.verify(path)
    assert not result.ok and "mechanism 'laplace'" in "; ".join(result.problems)


def test_a_report_says_which_partners_withheld_their_scores(tmp_path: Path) -> None:
    """A partner with node config withhold-metrics: the run's summary says so, its rows have no scores."""
    run = fake_run(tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    summary["partners"]["games"]["withheld"] = True
    (run / "summary.json").write_text(json.dumps(summary))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        if row["partner"] == "games":
            row.update({"test_ndcg@10": None, "valid_ndcg@10": None, "withheld": True})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    built = build_report(run)
    assert [(p["partner"], p["withheld_metrics"], len(p["quality"])) for p in built["partners"]] == [
        ("books", False, 4),
        ("games", True, 0),
    ]
    assert "| loss and quality metrics (sent without noise) | withheld by the partner (node config withhold-metrics) |" in to_markdown(
        built
    )
    own = build_report(run / "ledger" / "books.jsonl")  # a ledger alone does not say
    assert own["partners"][0].get("withheld_metrics") is None and "not known from a ledger alone" in to_markdown(own)


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("epsilon", float("nan"), "epsilon nan: expected a finite number of at least 0"),  # NaN compares false to everything
        ("epsilon", "0.3", "epsilon '0.3': expected a finite number"),
        ("round", "1", "round '1': expected a whole number of at least 1"),
        ("partner", 7, "partner 7: expected the partner's name"),
        ("noise_multiplier", float("inf"), "event 2 noise_multiplier inf: expected a finite number above 0"),  # Opacus never returns on it
        ("noise_multiplier", "0.9", "event 2 noise_multiplier '0.9': expected a finite number above 0"),
        ("steps", 99.5, "event 2 steps 99.5: expected a whole number of at least 0"),
    ],
)
def test_verify_names_a_damaged_field_instead_of_trusting_or_failing_on_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], field: str, value: object, words: str
) -> None:
    path = tmp_path / "ledger.jsonl"
    entry = json.loads(write_ledger(path, rounds=1, decline_last=False)[0])
    if field in ledger.EVENT_FIELDS:
        entry["events"][1][field] = value
    else:
        entry[field] = value
    _rewrite(path, [json.dumps(entry)])  # json writes NaN and Infinity, and reads them back
    result = ledger.verify(path)
    assert not result.ok and result.first_bad_line == 1 and words in result.problems[0], result.problems
    assert cli_main(["privacy", "verify", str(path)]) == 1
    assert f"{path}, line 1: {words}" in capsys.readouterr().out


def test_a_partner_never_writes_a_line_verify_would_refuse(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    write_ledger(path, rounds=1, decline_last=False)
    entry = ledger.make_entry(
        round=2, partner="books", status="trained", accountant="rdp", delta=1e-5, budget_epsilon=4.0, events=[], epsilon=0.0, examples=1
    )
    before = path.read_text()
    with pytest.raises(ValueError, match=r"not writing a ledger line to .*: epsilon nan: expected a finite number"):
        ledger.append(path, {**entry, "epsilon": float("nan")})
    assert path.read_text() == before and ledger.verify(path).ok
    with pytest.raises(ValueError, match=r"events \[\(inf, 0.02, 100\)\]: expected \(noise multiplier finite"):
        epsilon_of([(float("inf"), 0.02, 100)], delta=1e-5, accountant="rdp")


def _rewrite(path: Path, lines: list[str]) -> None:
    path.write_text("".join(x + "\n" for x in lines))


@pytest.mark.parametrize(
    ("tamper", "bad_line", "words"),
    [
        ("edit the note of line 2", 2, "line 2 was edited, or line 3"),
        ("lower the epsilon of line 3", 3, "its events give"),
        ("lower the noise of line 2 and fix its epsilon", 2, "line 2 was edited, or line 3"),
        ("edit the last line", 4, "line 4 was edited"),
        ("delete line 2", 2, "seq is 3, expected 2"),
        ("delete the first line", 1, "seq is 2, expected 1"),
        ("delete the last line", 4, "truncated"),
        ("cut the last line in half", 4, "cut off"),
        ("swap lines 2 and 3", 2, "seq is 3, expected 2"),
        ("swap lines and renumber", 1, "line 1 was edited, or line 2 was edited or moved"),
        ("not JSON", 3, "not valid JSON"),
    ],
)
def test_verify_finds_tampering_and_names_the_line(tmp_path: Path, tamper: str, bad_line: int, words: str) -> None:
    path = tmp_path / "ledger.jsonl"
    lines = write_ledger(path)
    head = ledger.head_of(path)
    entries = [json.loads(x) for x in lines]
    dump = json.dumps
    if tamper == "edit the note of line 2":
        entries[1]["note"] = "nothing to see"
        lines[1] = dump(entries[1])
    elif tamper == "lower the epsilon of line 3":
        entries[2]["epsilon"] = 0.5
        lines[2] = dump(entries[2])
    elif tamper == "lower the noise of line 2 and fix its epsilon":
        entries[1]["events"][0]["noise_multiplier"] = 5.0
        entries[1]["epsilon"] = epsilon_of([(5.0, 1.0, 1), (0.9, 0.02, 100), (5.0, 0.02, 100)], delta=1e-5, accountant="rdp")
        lines[1] = dump(entries[1])
    elif tamper == "edit the last line":
        entries[3]["note"] = "fine"
        lines[3] = dump(entries[3])
    elif tamper == "delete line 2":
        del lines[1]
    elif tamper == "delete the first line":
        del lines[0]
    elif tamper == "delete the last line":
        del lines[3]
    elif tamper == "cut the last line in half":
        path.write_text("".join(x + "\n" for x in lines[:3]) + lines[3][: len(lines[3]) // 2])
    elif tamper == "swap lines 2 and 3":
        lines[1], lines[2] = lines[2], lines[1]
    elif tamper == "swap lines and renumber":
        entries[1]["seq"], entries[2]["seq"] = 3, 2
        lines[1], lines[2] = dump(entries[2]), dump(entries[1])
    elif tamper == "not JSON":
        lines[2] = lines[2][:-5]
    if tamper != "cut the last line in half":
        _rewrite(path, lines)
    result = ledger.verify(path, head=head)
    assert not result.ok
    assert result.first_bad_line == bad_line, result.problems
    assert f"line {bad_line}" in result.problems[0] and words in result.problems[0], result.problems


def test_verify_command_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ledger.jsonl"
    lines = write_ledger(path)
    head = ledger.head_of(path)
    assert cli_main(["privacy", "verify", str(path)]) == 0
    out = capsys.readouterr().out
    assert "OK: 4 lines" in out and head.hash in out and "cannot be ruled out" in out
    _rewrite(path, lines[:3])
    assert cli_main(["privacy", "verify", str(path)]) == 0  # a clean cut needs the recorded head to be seen
    capsys.readouterr()
    assert cli_main(["privacy", "verify", str(path), "--head", f"{head.lines}:{head.hash}"]) == 1
    assert f"{path}, line 4: the ledger ends after line 3" in capsys.readouterr().out
    assert cli_main(["privacy", "verify", str(path), "--head", "4:nothex"]) != 0
    assert "--head '4:nothex': expected LINES:SHA256" in capsys.readouterr().err


# --------------------------------------------------------------------------- the report


def fake_run(root: Path) -> Path:
    """A run folder as the server writes it: ledgers, summary with heads, metrics per round."""
    run = root / "runs" / "r1"
    summary: dict[str, dict[str, object]] = {"partners": {}}
    rows = []
    for partner in ("books", "games"):
        path = run / "ledger" / f"{partner}.jsonl"
        lines = write_ledger(path, partner=partner)
        summary["partners"][partner] = {"ledger_head": ledger.head_of(path).to_dict()}
        for line in lines:
            e = json.loads(line)
            rows.append(
                {
                    "round": e["round"],
                    "partner": partner,
                    "epsilon": e["epsilon"],
                    "test_ndcg@10": 0.05 + 0.01 * e["round"],
                    "valid_ndcg@10": 0.06,
                }
            )
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "config.json").write_text(json.dumps({"rounds": 4, "target-epsilon": 4.0, "accountant": "rdp"}))
    return run


def test_report_of_a_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = fake_run(tmp_path)
    assert cli_main(["privacy", "report", str(run), "--out", str(tmp_path / "out")]) == 0
    assert "books" in capsys.readouterr().out
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    assert report["verified"] and report["anchored"] and [p["partner"] for p in report["partners"]] == ["books", "games"]
    books = report["partners"][0]
    assert books["rounds_joined"] == [1, 2, 3] and books["rounds_declined"] == [4]
    assert books["noise_multiplier"] == [0.9] and books["max_grad_norm"] == [1.0] and books["sample_rate"] == [0.02]
    assert books["item_counts_noise"] == [5.0]
    assert books["budget_left"] == pytest.approx(4.0 - books["epsilon"])
    assert books["independent_epsilon"]["integrated_rdp"] == pytest.approx(books["epsilon"], rel=1e-6)
    assert books["independent_epsilon"]["dp_accounting_rdp"] == pytest.approx(books["epsilon"], rel=0.01)
    assert books["independent_epsilon"]["dp_accounting_pld"] <= books["epsilon"]
    md = (out / "report.md").read_text()
    assert "## Partner books" in md and "What is not protected" in md and "item catalogue" in md
    assert "| epsilon by direct integration, RDP | " + f"{books['epsilon']:.4f} (equals the ledger's to 1e-6) |" in md
    assert "| loss and quality metrics (sent without noise) | sent each round: not covered by epsilon |" in md
    csv_rows = (out / "ledger.csv").read_text().splitlines()
    assert csv_rows[0].startswith("partner,seq,round,status,mechanism") and len(csv_rows) == 1 + 2 * (4 + 1)  # + round 1 item counts
    assert_page_shows_every_partner(out / "report.html", ["books", "games"], tmp_path, plots_each=2)


@pytest.mark.parametrize(
    ("file", "text", "words"),
    [
        ("summary.json", "{oops", "summary.json: not valid JSON (Expecting property name enclosed in double quotes at line 1, column 2)"),
        ("summary.json", "[]", "summary.json: expected a JSON object (the run's summary), got list"),
        (
            "summary.json",
            '{"partners": {"books": {"ledger_head": {"lines": "4"}}}}',
            "summary.json: partners.books.ledger_head {'lines': '4'}: expected",
        ),
        (
            "metrics.jsonl",
            '{"round": 1, "partner": "books"}\n[1]\n',
            "metrics.jsonl, line 2: expected a JSON object with 'round' and 'partner'",
        ),
        (
            "metrics.jsonl",
            '{"round": 1, "partner": "books", "epsilon": 0.5, "test_ndcg@10": NaN, "valid_ndcg@10": "0.06"}\n',
            "metrics.jsonl, line 1: test_ndcg@10 nan: expected null or a number from 0 to 1; valid_ndcg@10 '0.06': expected",
        ),
        ("config.json", "[1]", "config.json: expected a JSON object (the run's resolved config), got list"),
        (
            "summary.json",
            '{"partners": {"books": {"ledger_file": "../../elsewhere.jsonl"}}}',
            "summary.json: partners.books.ledger_file '../../elsewhere.jsonl': expected the ledger's path in the run folder",
        ),
    ],
)
def test_a_damaged_run_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str], file: str, text: str, words: str) -> None:
    run = fake_run(tmp_path)
    (run / file).write_text(text)
    assert cli_main(["privacy", "report", str(run), "--out", str(tmp_path / "out")]) == 2
    assert f"{run / file}{words.removeprefix(file)}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    if file == "summary.json":  # verify reads the recorded head from it too
        assert cli_main(["privacy", "verify", str(run / "ledger" / "books.jsonl")]) == 2
        assert str(run / file) in capsys.readouterr().err


def test_report_flags_a_tampered_run_and_exits_non_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = fake_run(tmp_path)
    path = run / "ledger" / "games.jsonl"
    path.write_text("".join(x + "\n" for x in path.read_text().splitlines()[:2]))  # the last two lines removed
    assert cli_main(["privacy", "report", str(run), "--out", str(tmp_path / "out")]) == 1
    assert "games" in capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert not report["verified"] and "truncated" in report["partners"][1]["problems"][0]
    assert "Verification FAILED" in (tmp_path / "out" / "report.md").read_text()


def test_a_run_report_accounts_for_every_partner_of_the_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = fake_run(tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    summary["partners"]["gear"] = {"rounds_trained": 0, "last_round": 4}  # never sampled: no ledger, nothing released
    (run / "summary.json").write_text(json.dumps(summary))
    assert cli_main(["privacy", "report", str(run), "--out", str(tmp_path / "out")]) == 0
    assert "released nothing in this run (no ledger; trained in no round): gear" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "report.json").read_text())["released_nothing"] == ["gear"]
    assert "(they trained in no round, e.g. never sampled, so released nothing): gear." in (tmp_path / "out" / "report.md").read_text()
    # a ledger the summary records, deleted from the run folder, and a partner the summary says trained
    # without any ledger: neither is left out of the report, each fails it
    (run / "ledger" / "games.jsonl").unlink()
    summary["partners"]["kids"] = {"rounds_trained": 1, "last_round": 4}
    (run / "summary.json").write_text(json.dumps(summary))
    assert cli_main(["privacy", "report", str(run), "--out", str(tmp_path / "gone")]) == 1
    out = capsys.readouterr().out
    assert f"{run / 'ledger' / 'games.jsonl'}: no such ledger file: the run recorded 4 line(s) of it" in out
    assert f"{run / 'ledger' / 'kids.jsonl'}: no such ledger file" in out
    report = json.loads((tmp_path / "gone" / "report.json").read_text())
    assert [(p["partner"], p["verified"]) for p in report["partners"]] == [("books", True), ("games", False), ("kids", False)]
    assert report["released_nothing"] == ["gear"]
    assert "Verification FAILED" in (tmp_path / "gone" / "report.md").read_text()
    assert_page_shows_every_partner(
        tmp_path / "gone" / "report.html", ["books", "games", "kids"], tmp_path, plots_each=0
    )  # kids: nothing to plot


def test_a_partner_reports_from_its_own_ledger(tmp_path: Path) -> None:
    path = tmp_path / "state" / "ledger.jsonl"
    write_ledger(path, partner="gear")
    head = ledger.head_of(path)
    assert cli_main(["privacy", "report", str(path), "--head", f"{head.lines}:{head.hash}"]) == 0
    report = json.loads((tmp_path / "state" / "privacy-report" / "report.json").read_text())
    assert report["kind"] == "ledger" and report["anchored"] and report["partners"][0]["partner"] == "gear"
    assert_page_shows_every_partner(tmp_path / "state" / "privacy-report" / "report.html", ["gear"], tmp_path)


def reserve_as_ledger(path: Path, ledger_path: Path, *, run: str, rounds: list[int] | None = None) -> None:
    """Reserves a ledger's releases in a privacy account, as the partner did before training."""
    for line in ledger_path.read_text().splitlines():
        entry = json.loads(line)
        if entry["events"] and (rounds is None or entry["round"] in rounds):
            account.reserve(path, run=run, server_round=entry["round"], events=entry["events"], cap=9.0, delta=1e-5)


def test_a_partner_report_adds_its_lifetime_account(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "state" / "ledger.jsonl"
    write_ledger(path, partner="gear")
    earlier = tmp_path / "earlier.jsonl"
    write_ledger(earlier, partner="gear", rounds=2, decline_last=False)
    beside = tmp_path / "state" / "privacy-account.jsonl"  # the default place, found without --account
    reserve_as_ledger(beside, earlier, run="spring")
    reserve_as_ledger(beside, path, run="autumn")
    assert cli_main(["privacy", "report", str(path)]) == 0
    assert "lifetime epsilon" in capsys.readouterr().out
    report = json.loads((tmp_path / "state" / "privacy-report" / "report.json").read_text())
    life = report["partners"][0]["lifetime"]
    assert life["verified"] and life["this_run"] == ["autumn"] and list(life["runs"]) == ["spring", "autumn"]
    assert life["epsilon"] > report["partners"][0]["epsilon"]  # two runs on the same users compose
    entries = account.read(beside)  # RDP at the order the account's first line fixed
    assert life["epsilon"] == pytest.approx(epsilon_of(ledger.events_of(entries), delta=1e-5, accountant="rdp", order=entries[0]["order"]))
    assert "Over every run on this data" in (tmp_path / "state" / "privacy-report" / "report.md").read_text()


def test_a_round_run_twice_needs_two_reservations(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "state" / "ledger.jsonl"
    write_ledger(path, partner="gear", rounds=3, decline_last=False, again=2)  # rounds 1, 2, 2, 3
    assert ledger.verify(path).ok
    once, twice = tmp_path / "once.jsonl", tmp_path / "twice.jsonl"
    reserve_as_ledger(twice, path, run="autumn")
    reserve_as_ledger(once, path, run="autumn", rounds=[1, 3])
    round_2 = next(json.loads(x) for x in path.read_text().splitlines() if json.loads(x)["round"] == 2)
    account.reserve(once, run="autumn", server_round=2, events=round_2["events"], cap=9.0, delta=1e-5)

    assert cli_main(["privacy", "report", str(path), "--account", str(twice), "--out", str(tmp_path / "ok")]) == 0
    life = json.loads((tmp_path / "ok" / "report.json").read_text())["partners"][0]["lifetime"]
    assert life["verified"] and life["this_run"] == ["autumn"]
    # one reservation cannot cover both releases of round 2: the account would count one of them only
    assert cli_main(["privacy", "report", str(path), "--account", str(once), "--out", str(tmp_path / "short")]) == 1
    assert "round 2 released 2 times in this ledger" in capsys.readouterr().out
    life = json.loads((tmp_path / "short" / "report.json").read_text())["partners"][0]["lifetime"]
    assert not life["verified"] and life["this_run"] == [] and len(life["problems"]) == 1
    assert "only 1 of those releases are reserved" in life["problems"][0]


def test_a_round_reserved_and_lost_before_its_release_is_named_and_still_counted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The partner stopped while training round 2 (tests/test_deployment.py does it to a real SuperNode): its
    reservation stays in the account; its ledger holds the round it ran again after, not the lost one."""
    path = tmp_path / "state" / "ledger.jsonl"
    write_ledger(path, partner="gear", rounds=3, decline_last=False)
    lines = path.read_text().splitlines()
    beside = tmp_path / "state" / "privacy-account.jsonl"
    reserve_as_ledger(beside, path, run="autumn", rounds=[1])
    lost = json.loads(lines[1])
    account.reserve(beside, run="autumn", server_round=2, events=lost["events"], cap=9.0, delta=1e-5)  # then the crash
    reserve_as_ledger(beside, path, run="autumn", rounds=[2, 3])  # round 2 again, then 3
    assert cli_main(["privacy", "report", str(path)]) == 0  # it understates nothing: verified
    out = capsys.readouterr().out
    assert "reserved in the account, in no line of this ledger: round 2: lost between the reservation and the release" in out
    report = json.loads((tmp_path / "state" / "privacy-report" / "report.json").read_text())
    life = report["partners"][0]["lifetime"]
    assert life["verified"] and life["this_run"] == ["autumn"] and life["reserved_not_released"] == [2]
    assert life["epsilon"] > report["partners"][0]["epsilon"]  # the lost round counts
    assert (
        "| reserved there, released in no line of this ledger | round 2: lost"
        in (tmp_path / "state" / "privacy-report" / "report.md").read_text()
    )
    # a ledger whose every reservation it holds says so
    reserve_as_ledger(tmp_path / "exact.jsonl", path, run="autumn")
    assert cli_main(["privacy", "report", str(path), "--account", str(tmp_path / "exact.jsonl"), "--out", str(tmp_path / "exact")]) == 0
    assert json.loads((tmp_path / "exact" / "report.json").read_text())["partners"][0]["lifetime"]["reserved_not_released"] == []


def test_a_release_missing_from_the_account_fails_the_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ledger.jsonl"
    write_ledger(path, partner="gear")
    other = tmp_path / "elsewhere" / "account.jsonl"
    reserve_as_ledger(other, path, run="autumn", rounds=[1, 2])  # round 3 trained but never reserved
    assert cli_main(["privacy", "report", str(path), "--account", str(other), "--out", str(tmp_path / "out")]) == 1
    out = capsys.readouterr().out
    assert "round 3 in this ledger are not reserved in the account" in out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert not report["verified"] and report["partners"][0]["lifetime"]["this_run"] == []
    assert "Verification FAILED" in (tmp_path / "out" / "report.md").read_text()
    # an account is one partner's: with a run folder it is refused, by name
    run = fake_run(tmp_path)
    assert cli_main(["privacy", "report", str(run), "--account", str(other)]) == 2
    assert "a privacy account belongs to one partner" in capsys.readouterr().err
