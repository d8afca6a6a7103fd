"""The coordinator's list of partners (server.partner_list): names bound to registered SuperNodes."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from server.partner_list import PartnerListError, load_partner_list
from server.rounds import end_round
from server.run_folder import RunFolder
from server.server_app import main as server_main
from server.strategy import PartnerFedAvg
from shared.cli import main as cli_main
from shared.federation import wire
from shared.federation.settings import FederationSettings
from shared.privacy.report import build_report, to_markdown
from tests.test_screening import SENT, _Grid, evaluation_content, instruction, reply, train_content

BIG_ID = 12899461359462064038  # as 'flwr supernode register' printed one: beyond TOML's largest integer


@pytest.fixture(autouse=True)
def _task_identity() -> Iterator[None]:  # Flower's Messages are made outside a run here
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield


def test_a_list_reads_node_ids_beyond_tomls_integers(tmp_path: Path) -> None:
    path = tmp_path / "partners.toml"
    path.write_text(f'# who may take part\n[partners]\nbooks = "{BIG_ID}"\n"amazon2014-toy" = 7\n')
    partners = load_partner_list(path)
    assert partners.names == {BIG_ID: "books", 7: "amazon2014-toy"}
    assert partners.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() and partners.path == path.resolve()
    assert partners.name_of(8) is None


def test_every_problem_of_a_list_is_named_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "partners.toml"
    path.write_text(
        "federation = 'partners'\n"
        "[partners]\n"
        "books = 12.5\n"
        'games = "18446744073709551616"\n'  # 2**64: beyond Flower's node ids
        'gear = "41"\n'
        'tools = "41"\n'
        '"a b" = "5"\n'
        'a_b = "6"\n'
    )
    with pytest.raises(PartnerListError) as err:
        load_partner_list(path)
    problems = str(err.value).splitlines()[1:]
    assert [p.strip().split(": ", 1)[0] for p in problems] == [f"{path} line {n}" for n in (1, 3, 4, 6, 8)]
    assert "unknown key 'federation'; expected only the table [partners]" in problems[0]
    assert "books = 12.5: expected the node id that 'flwr supernode register' printed" in problems[1]
    assert 'in quotes (books = "12899461359462064038")' in problems[1]
    assert "from 1 to 18446744073709551615" in problems[2]
    assert "node id 41 is listed for both 'gear' and 'tools'" in problems[3]
    assert "'a_b' and 'a b' would share the ledger copy ledger/a_b.jsonl" in problems[4]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, "not found (run config 'partners-file'"),
        ("[partners\n", "not valid TOML: Expected ']' at the end of a table declaration (at line 1, column 10)"),
        ("[partners]\n", "expected a [partners] table with one line per partner"),
        ("books = '1'\n", "unknown key 'books'"),
    ],
)
def test_a_list_that_cannot_be_read_says_why(tmp_path: Path, text: str | None, expected: str) -> None:
    path = tmp_path / "partners.toml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(PartnerListError, match=r"(?s).*" + expected.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_partner_list(path)


def test_only_listed_supernodes_are_sampled_and_every_reply_goes_under_its_nodes_listed_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "partners.toml"
    path.write_text('[partners]\nbooks = "1"\ngames = "2"\n')
    strategy = PartnerFedAvg(partner_list=load_partner_list(path))
    grid = _Grid()  # nodes 1 to 4 connected: 3 and 4 are not on the list
    for rnd in (1, 2):
        sampled = strategy.configure_train(rnd, ArrayRecord(SENT), ConfigRecord({}), grid=grid)  # type: ignore[arg-type]
        assert sorted(m.metadata.dst_node_id for m in sampled) == [1, 2]
        evaluated = strategy.configure_evaluate(rnd, ArrayRecord(SENT), ConfigRecord({}), grid=grid)  # type: ignore[arg-type]
        assert sorted(m.metadata.dst_node_id for m in evaluated) == [1, 2]
    said = capsys.readouterr().out.splitlines()
    assert said == [f"SuperNode {n} is connected but not on the list of partners ({path.resolve()}): it is not sampled" for n in (3, 4)]

    # round 1: node 2 reports as "books"; its update is left out, and its records stay games'
    impostor = train_content(5.0, name="books")
    impostor[wire.PARTNER] = ConfigRecord({"name": "books", "note": "", "ledger": '{"partner": "games"}\n'})
    arrays, _ = strategy.aggregate_train(1, [reply(1, train_content(1.0, name="books")), reply(2, impostor)])
    assert arrays is not None
    torch.testing.assert_close(arrays.to_torch_state_dict()["w"], SENT["w"])  # node 1's update alone
    strategy.aggregate_evaluate(1, [reply(1, evaluation_content("books", 0.1)), reply(2, evaluation_content("books", 0.2))])
    run = RunFolder(tmp_path / "run")
    rows = {r["partner"]: r for r in end_round(run, 1, arrays.to_torch_state_dict(), strategy.finish_round(1), encoder_bytes=10**6)}
    assert sorted(rows) == ["books", "games"] and rows["books"]["node_id"] == 1 and rows["games"]["node_id"] == 2
    assert not rows["books"]["rejected"] and rows["books"]["test_ndcg@10"] == pytest.approx(0.1)
    assert rows["games"]["rejected"] and rows["games"]["test_ndcg@10"] == pytest.approx(0.2)
    assert rows["games"]["note"].startswith(
        "the server rejected this update: the reply gives the name 'books', but SuperNode 2 is listed as 'games' in partners.toml; "
        "the partner should set domain='games' in its --node-config"
    )
    assert "another SuperNode gave the name" not in rows["games"]["note"]
    assert run.ledger_path("games").read_text() == '{"partner": "games"}\n'  # its privacy spend stays on its own record

    # round 2: a failure names no partner, the list does; a reply from an unlisted node is left out
    failed = Message(Error(code=0, reason="out of memory"), reply_to=instruction(1))
    arrays, _ = strategy.aggregate_train(2, [failed, reply(2, train_content(3.0, name="games")), reply(3, train_content(name="gear"))])
    assert arrays is not None
    torch.testing.assert_close(arrays.to_torch_state_dict()["w"], 3 * SENT["w"])
    rows = {r["partner"]: r for r in end_round(run, 2, arrays.to_torch_state_dict(), strategy.finish_round(2), encoder_bytes=10**6)}
    assert rows["books"]["failed"] and not rows["games"]["rejected"]
    assert (
        rows["node-3"]["note"]
        == f"the server rejected this update: SuperNode 3 is not on the coordinator's list of partners ({path.resolve()})"
    )

    # the run folder says on what authority the names stand, and so does the privacy officer's report
    run.write_summary(settings=FederationSettings(), adapter_bytes=100, encoder_bytes=10**6, names=strategy.partner_list.record())  # type: ignore[union-attr]
    summary = json.loads((run.root / "summary.json").read_text())
    assert summary["partner_names"] == {
        "bound_by": "partners-file",
        "file": str(path.resolve()),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "partners": {"1": "books", "2": "games"},
    }
    line = f"Partner names: from the coordinator's list partners.toml (SHA-256 {summary['partner_names']['sha256'][:16]}...)"
    assert line in (run.root / "summary.md").read_text()
    assert line in to_markdown(build_report(run.root))


def test_without_a_list_names_are_the_partners_own_and_the_run_says_so(tmp_path: Path) -> None:
    strategy, run = PartnerFedAvg(), RunFolder(tmp_path / "run")
    strategy.configure_train(1, ArrayRecord(SENT), ConfigRecord({}), grid=_Grid())  # type: ignore[arg-type]
    arrays, _ = strategy.aggregate_train(1, [reply(3, train_content(name="gear"))])
    assert arrays is not None
    end_round(run, 1, arrays.to_torch_state_dict(), strategy.finish_round(1), encoder_bytes=10**6)
    run.write_summary(settings=FederationSettings(), adapter_bytes=100, encoder_bytes=10**6)
    assert json.loads((run.root / "summary.json").read_text())["partner_names"] == {"bound_by": "self-declared"}
    expected = "Partner names: as each partner gave it (a SuperNode's domain, a simulated partner's scenario name), not bound to a registered SuperNode."
    assert expected in (run.root / "summary.md").read_text() and expected in to_markdown(build_report(run.root))


def test_a_run_with_a_list_that_cannot_be_read_stops_before_it_writes_anything(tmp_path: Path) -> None:
    path = tmp_path / "partners.toml"
    path.write_text('[partners]\nbooks = "-1"\n')
    run_config = {**FederationSettings().to_run_config(), "runs-dir": str(tmp_path / "runs"), "run-id": "r", "partners-file": str(path)}
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    with pytest.raises(PartnerListError, match=rf"{path} line 2: books = '-1': expected the node id"):
        server_main(_Grid(), context)  # type: ignore[arg-type]
    assert not (tmp_path / "runs").exists()


def test_the_coordinator_checks_its_list_before_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "partners.toml"
    path.write_text(f'[partners]\ngames = "7"\nbooks = "{BIG_ID}"\n')
    assert cli_main(["partners", "check", str(path)]) == 0
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert capsys.readouterr().out.splitlines() == [
        f"{path}: OK, 2 partner(s), SHA-256 {sha}",
        f"  books  SuperNode {BIG_ID}",
        "  games  SuperNode 7",
    ]
    path.write_text("[partners]\nbooks = 7\ngames = 7\n")
    assert cli_main(["partners", "check", str(path)]) == 2
    assert capsys.readouterr().err == (
        f"fedxrec partners: error: invalid partners-file:\n  {path} line 3: node id 7 is listed for both 'books' and 'games'; "
        "one SuperNode is one partner\n"
    )
