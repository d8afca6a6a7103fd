"""The coordinator's check of partners' replies (server.screening), on real Flower Messages."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg
from flwr.supercore.task_identity import TaskIdentity

from server.rounds import end_round, round_rows
from server.run_folder import RunFolder
from server.screening import evaluate_reply_problems, train_reply_problems
from server.strategy import PartnerFedAvg, make_strategy
from shared.federation import wire
from shared.federation.settings import FederationSettings
from shared.privacy import ledger
from shared.privacy.report import build_report
from tests.test_privacy_officer import write_ledger

SENT = {"w": torch.ones(4, 3), "b": torch.zeros(3)}


@pytest.fixture(autouse=True)
def _task_identity() -> Iterator[None]:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield


def train_metrics(examples: int = 10, **changes: Any) -> dict[str, Any]:
    metrics = {
        "num-examples": examples,
        "loss": 1.5,
        "steps": 3,
        "epsilon": 2.0,
        "delta": 1e-5,
        "noise-multiplier": 1.1,
        "sample-rate": 0.1,
        "declined": 0,
        **changes,
    }
    return {k: v for k, v in metrics.items() if v is not None}  # None: leave the metric out


def train_content(
    scale: float = 1.0, *, name: str = "books", examples: int = 10, arrays: dict[str, torch.Tensor] | None = None, **metrics: Any
) -> RecordDict:
    """A partner's training reply: ``scale`` x the sent adapter, or ``arrays``."""
    return RecordDict(
        {
            wire.ARRAYS: ArrayRecord(arrays if arrays is not None else {k: scale * v for k, v in SENT.items()}),
            wire.METRICS: MetricRecord(train_metrics(examples, **metrics)),
            wire.PARTNER: ConfigRecord({"name": name, "note": "", "ledger": f'{{"partner": "{name}"}}\n'}),
        }
    )


def instruction(node: int) -> Message:
    return Message(content=RecordDict({wire.ARRAYS: ArrayRecord(SENT)}), dst_node_id=node, message_type=MessageType.TRAIN)


def reply(node: int, content: RecordDict) -> Message:
    return Message(content=content, reply_to=instruction(node))


def test_a_well_formed_reply_passes_and_only_a_declined_one_may_have_no_examples() -> None:
    assert train_reply_problems(train_content(), sent=SENT) == []
    assert train_reply_problems(train_content(examples=0, declined=1), sent=SENT) == []
    evaluation = {"num-examples": 40, **dict.fromkeys(wire.EVALUATE_METRICS[1:], 0.5)}
    assert evaluate_reply_problems(RecordDict({wire.METRICS: MetricRecord(evaluation)})) == []
    no_users = RecordDict({wire.METRICS: MetricRecord({**evaluation, "num-examples": 0})})
    assert evaluate_reply_problems(no_users) == [
        "num-examples is 0: an evaluation over no users scores nothing (and weighs nothing in the average)"
    ]


def with_record(name: str, record: ConfigRecord | None) -> RecordDict:
    """A well-formed training reply with its record ``name`` replaced (None: removed)."""
    content = train_content()
    if record is None:
        del content[name]
    else:
        content[name] = record
    return content


def _one_nan() -> dict[str, torch.Tensor]:
    w = SENT["w"].clone()
    w[1, 2] = float("nan")
    return {"w": w, "b": SENT["b"]}


BROKEN = {
    "NaN everywhere": (train_content(arrays={"w": SENT["w"].clone().fill_(float("nan")), "b": SENT["b"]}), "w: 12 non-finite value(s)"),
    "one NaN": (train_content(arrays=_one_nan()), "w: 1 non-finite value(s)"),
    "another shape": (train_content(arrays={"w": torch.ones(3, 3), "b": SENT["b"]}), "w: shape (3, 3), expected (4, 3)"),
    "another dtype": (train_content(arrays={"w": SENT["w"].double(), "b": SENT["b"]}), "w: dtype torch.float64, expected torch.float32"),
    "a missing array": (train_content(arrays={"w": SENT["w"]}), "missing b"),
    "an extra array": (train_content(arrays={**SENT, "extra": torch.ones(1)}), "unexpected extra"),
    "an extra metric": (train_content(accuracy=0.9), "unexpected metric 'accuracy'"),
    "a missing metric": (train_content(loss=None), "no metric 'loss'"),
    "a list metric": (train_content(loss=[1.0, 2.0]), "metric 'loss' is [1.0, 2.0], expected one finite number"),
    "an infinite epsilon": (train_content(epsilon=float("inf")), "metric 'epsilon' is inf"),
    "no examples in a trained round": (train_content(examples=0), "num-examples is 0 in a round the partner trained"),
    "negative examples": (train_content(examples=-3), "num-examples is -3, expected a whole number"),
    "fractional examples": (train_content(examples=2.5), "num-examples is 2.5, expected a whole number"),  # type: ignore[arg-type]
    "declined 2": (train_content(declined=2), "metric 'declined' is 2, expected 0 or 1"),
    "an extra record": (with_record("extra", ConfigRecord({"a": 1})), "unexpected record 'extra'"),
    "no arrays": (with_record(wire.ARRAYS, None), "no 'arrays' record"),
    "metrics of another kind": (
        with_record(wire.METRICS, ConfigRecord({"loss": "low"})),
        "record 'metrics' is of another kind than declared",
    ),
    "a ledger that is not text": (
        with_record(wire.PARTNER, ConfigRecord({"name": "p", "ledger": ["{}", "{}"]})),
        "partner field 'ledger' is not text",
    ),
    "an extra partner field": (with_record(wire.PARTNER, ConfigRecord({"name": "p", "email": "x"})), "unexpected partner field 'email'"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_every_break_of_the_wire_contract_is_named(case: str) -> None:
    content, expected = BROKEN[case]
    problems = train_reply_problems(content, sent=SENT)
    assert any(expected in p for p in problems), problems


def test_fedavg_leaves_a_broken_reply_out_and_the_run_goes_on(tmp_path: Path) -> None:
    good = [reply(1, train_content(1.0, name="books", examples=10)), reply(2, train_content(3.0, name="games", examples=30))]
    poisoned = reply(3, train_content(name="gear", arrays={"w": SENT["w"] * float("inf"), "b": SENT["b"]}, examples=1000))
    renamed = reply(4, train_content(name="music", arrays={"weight": SENT["w"], "b": SENT["b"]}))
    # Flower's FedAvg alone stops the round on the renamed reply, and averages the poisoned one in
    with pytest.raises(InconsistentMessageReplies):
        FedAvg().aggregate_train(1, [*good, renamed])
    averaged, _ = FedAvg().aggregate_train(1, [*good, poisoned])
    assert averaged is not None and not torch.isfinite(averaged.to_torch_state_dict()["w"]).any()

    strategy = PartnerFedAvg()
    strategy.configure_train(1, ArrayRecord(SENT), ConfigRecord({}), grid=_Grid())  # type: ignore[arg-type]
    arrays, _ = strategy.aggregate_train(1, [*good, poisoned, renamed])
    assert arrays is not None
    torch.testing.assert_close(arrays.to_torch_state_dict()["w"], torch.full((4, 3), 2.5))  # (10 x 1 + 30 x 3) / 40

    # the run folder says which updates were left out and why; the partners' ledger lines are kept
    run = RunFolder(tmp_path / "run")
    rows = {r["partner"]: r for r in end_round(run, 1, arrays.to_torch_state_dict(), strategy.finish_round(1), encoder_bytes=10**6)}
    assert [p for p, r in rows.items() if r["rejected"]] == ["gear", "music"]
    assert rows["books"]["num_examples"] == 10 and rows["books"]["note"] == ""
    assert rows["gear"]["note"] == "the server rejected this update: w: 12 non-finite value(s) (NaN or infinity)"
    assert rows["gear"]["epsilon"] == 2.0 and rows["gear"]["num_examples"] == 1000  # what it reported stays on record
    assert rows["music"]["note"] == "the server rejected this update: missing w; unexpected weight"
    assert run.ledger_path("gear").read_text() == '{"partner": "gear"}\n'
    summary = run.write_summary(settings=FederationSettings(), adapter_bytes=100, encoder_bytes=10**6)
    assert summary["partners"]["gear"]["rounds_rejected"] == 1 and summary["partners"]["books"]["rounds_trained"] == 1
    assert "| rounds trained | declined | rejected |" in (run.root / "summary.md").read_text()


@pytest.mark.parametrize(("aggregation", "expected"), [("fedavg", None), ("median", 1.05), ("trimmed-mean", 1.05)])
def test_a_robust_average_is_not_pulled_away_by_one_harmful_update(aggregation: str, expected: float | None) -> None:
    """A well-formed update passes the contract whatever it holds: only a robust average bounds what one partner does."""
    honest = [(1, 1.0), (2, 1.1), (3, 0.9), (4, 1.05)]  # node, scale of the sent adapter
    replies = [reply(node, train_content(scale, name=f"p{node}", examples=100)) for node, scale in honest]
    replies.append(reply(5, train_content(1000.0, name="harm", examples=10**6)))  # and it overstates its users
    strategy = make_strategy(FederationSettings(aggregation=aggregation))
    flower = {"fedavg": FedAvg, "median": FedMedian, "trimmed-mean": FedTrimmedAvg}[aggregation]
    assert isinstance(strategy, PartnerFedAvg) and isinstance(strategy, flower)  # Flower's own average, behind our checks
    strategy.configure_train(1, ArrayRecord(SENT), ConfigRecord({}), grid=_Grid())  # type: ignore[arg-type]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    w = arrays.to_torch_state_dict()["w"]
    if expected is None:  # FedAvg: the harmful partner's weight is 10**6 of 10**6 + 400
        assert w.mean() > 990
    else:  # the median of 0.9, 1, 1.05, 1.1, 1000; the mean of the middle three (one cut at each end of five)
        torch.testing.assert_close(w, torch.full((4, 3), expected))
    assert w.dtype == torch.float32  # what partners check the next round's adapter against
    rows = round_rows(1, strategy.finish_round(1))
    assert sorted(r["partner"] for r in rows) == ["harm", "p1", "p2", "p3", "p4"] and not any(r["rejected"] for r in rows)


def test_every_update_rejected_keeps_the_adapter() -> None:
    strategy = PartnerFedAvg()
    strategy.configure_train(1, ArrayRecord(SENT), ConfigRecord({}), grid=_Grid())  # type: ignore[arg-type]
    assert strategy.aggregate_train(1, [reply(1, train_content(examples=0))]) == (None, None)


def test_a_partner_whose_clientapp_failed_is_named_in_its_row(tmp_path: Path) -> None:
    strategy = PartnerFedAvg()
    strategy.configure_train(1, ArrayRecord(SENT), ConfigRecord({}), grid=_Grid())  # type: ignore[arg-type]
    strategy.aggregate_train(1, [reply(1, train_content(name="books")), reply(2, train_content(name="games"))])
    strategy.finish_round(1)  # as the server does at the end of each round
    strategy.configure_train(2, ArrayRecord(SENT), ConfigRecord({}), grid=_Grid())  # type: ignore[arg-type]
    reason = "<class 'ValueError'>:<'the server's arrays: not weights of this adapter'>"  # as Flower reports a raise
    failures = [Message(Error(code=0, reason=reason), reply_to=instruction(node)) for node in (1, 7)]
    arrays, _ = strategy.aggregate_train(2, [*failures, reply(2, train_content(3.0, name="games"))])
    assert arrays is not None
    torch.testing.assert_close(arrays.to_torch_state_dict()["w"], 3 * SENT["w"])
    rows = {r["partner"]: r for r in round_rows(2, strategy.finish_round(2))}
    assert rows["books"]["failed"] and rows["books"]["note"] == f"the partner's update failed: {reason}"
    assert rows["node-7"]["failed"]  # a node that never replied has no name yet
    assert not rows["games"]["failed"] and not rows["games"]["rejected"]


RAY_REASON = (  # as Flower's simulation engine reports a ClientApp that raised: Ray's traceback, then the message again
    "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::ClientAppActor.run()\x1b[39m (pid=1)\n"
    '  File "client/client_app.py", line 40, in train\n    raise RuntimeError(wire.failure_text(name, err)) from err\n'
    'RuntimeError: fedxrec partner "gear" failed: ValueError: state.pt: cannot be read\n\n'
    "flwr.clientapp.client_app.ClientAppException: \nException ClientAppException occurred. Message: "
    'fedxrec partner "gear" failed: ValueError: state.pt:   cannot be read\'>'
)


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        (RAY_REASON, ("gear", "ValueError: state.pt: cannot be read")),
        (  # as a SuperNode reports it
            "<class 'RuntimeError'>:<'fedxrec partner \"data \\\"x\\\"\" failed: OSError: disk full'>",
            ('data "x"', "OSError: disk full"),
        ),
        ("<class 'ValueError'>:<'node config needs\n data-path'>", (None, "<class 'ValueError'>:<'node config needs data-path'>")),
        ('fedxrec partner "unterminated failed: x', (None, 'fedxrec partner "unterminated failed: x')),
        (  # before the partner knew its own name
            "<class 'RuntimeError'>:<'fedxrec partner null failed: ValueError: invalid node config:\n  data-path'>",
            (None, "ValueError: invalid node config: data-path"),
        ),
    ],
)
def test_a_failure_names_its_partner_in_its_own_words(reason: str, expected: tuple[str | None, str]) -> None:
    assert wire.read_failure(reason) == expected


def test_a_failure_names_the_partners_folders_by_their_keys_only(tmp_path: Path) -> None:
    (tmp_path / "real-state").mkdir()
    (tmp_path / "state").symlink_to(tmp_path / "real-state")
    private = {"data-path": str(tmp_path / "data"), "state-dir": str(tmp_path / "state")}
    err = ValueError(
        f"{tmp_path}/data/reviews.csv line 3: rating must be a number; {tmp_path}/real-state/runs/r1/state.pt: cannot be read; "
        f"{tmp_path}/state/privacy-account.jsonl; {tmp_path}/data2/x.csv; see /home/alice/fedxrec/client/partner.py, 1/2 of users, data/x.csv"
    )
    text = wire.failure_text("gear", err, private_paths=private)
    assert str(tmp_path) not in text and "alice" not in text
    assert wire.read_failure(text) == (
        "gear",
        "ValueError: <data-path>/reviews.csv line 3: rating must be a number; <state-dir>/runs/r1/state.pt: cannot be read; "
        "<state-dir>/privacy-account.jsonl; …/x.csv; see …/partner.py, 1/2 of users, data/x.csv",
    )
    # a simulated partner's files are the researcher's own
    assert wire.failure_text("gear", err) == f'fedxrec partner "gear" failed: ValueError: {err}'


def test_a_failure_is_named_by_its_text_or_else_by_the_node_earlier_rounds_named(tmp_path: Path) -> None:
    failures = [
        Message(Error(code=0, reason=RAY_REASON), reply_to=instruction(5)),  # never replied before: its text names it
        Message(Error(code=0, reason="<class 'MemoryError'>:<''>"), reply_to=instruction(1)),  # "books" in the run's earlier rounds
    ]
    resumed = PartnerFedAvg(first_round=3, holders={"books": 1})
    resumed.configure_train(1, ArrayRecord(SENT), ConfigRecord({}), grid=_Grid())  # type: ignore[arg-type]
    assert resumed.aggregate_train(1, failures) == (None, None)
    rows = {r["partner"]: r for r in round_rows(3, resumed.finish_round(1))}
    assert rows["gear"]["failed"] and rows["gear"]["note"] == "the partner's update failed: ValueError: state.pt: cannot be read"
    assert rows["books"]["failed"] and rows["books"]["note"] == "the partner's update failed: <class 'MemoryError'>:<''>"


def evaluation_content(name: str, ndcg: float) -> RecordDict:
    metrics = {"num-examples": 40, **dict.fromkeys(wire.EVALUATE_METRICS[1:], ndcg), "global-weight": 1.0}
    return RecordDict({wire.METRICS: MetricRecord(metrics), wire.PARTNER: ConfigRecord({"name": name, "note": ""})})


def test_two_supernodes_of_one_name_keep_their_records_apart(tmp_path: Path) -> None:
    """Two containers that both mount their data at /data both call themselves "data"."""
    names = {1: "data", 2: "data", 3: "books"}  # node id -> the name it gives
    own = {
        node: write_ledger(tmp_path / f"partner-{node}.jsonl", partner=name, rounds=2, decline_last=False) for node, name in names.items()
    }
    strategy, run = PartnerFedAvg(), RunFolder(tmp_path / "run")
    for rnd, order in ((1, (1, 2, 3)), (2, (2, 1, 3))):  # the holder of a name keeps it, whichever replies first
        strategy.configure_train(rnd, ArrayRecord(SENT), ConfigRecord({}), grid=_Grid())  # type: ignore[arg-type]
        replies = []
        for node in order:
            content = train_content(float(node), name=names[node])
            sent = "".join(line + "\n" for line in own[node][:rnd])  # the partner's ledger after this round
            content[wire.PARTNER] = ConfigRecord({"name": names[node], "note": "", "ledger": sent})
            replies.append(reply(node, content))
        arrays, _ = strategy.aggregate_train(rnd, replies)
        assert arrays is not None  # both are averaged in: each is a partner of its own
        torch.testing.assert_close(arrays.to_torch_state_dict()["w"], 2 * SENT["w"])
        strategy.aggregate_evaluate(rnd, [reply(node, evaluation_content(names[node], 0.1 * node)) for node in order])
        rows = {r["partner"]: r for r in end_round(run, rnd, arrays.to_torch_state_dict(), strategy.finish_round(rnd), encoder_bytes=10**6)}
        assert sorted(rows) == ["books", "data", "data@node-2"]
        assert rows["data"]["test_ndcg@10"] == pytest.approx(0.1) and rows["data@node-2"]["test_ndcg@10"] == pytest.approx(0.2)
        assert rows["data"]["note"] == "" and rows["books"]["note"] == ""
        assert rows["data@node-2"]["note"] == (
            "another SuperNode gave the name 'data' this round: this one's rows and ledger copy are kept apart as 'data@node-2'; "
            "give each SuperNode a name of its own (domain='<name>' in its --node-config)"
        )
    # a resumed run (a new ServerApp, the same SuperNodes) gives each name to the node that held it
    resumed = PartnerFedAvg(first_round=3, holders=run.name_holders())
    resumed.aggregate_evaluate(1, [reply(node, evaluation_content(names[node], 0.1 * node)) for node in (2, 1, 3)])
    assert {r.node_id: r.partner for r in resumed.finish_round(1).evaluate} == {1: "data", 2: "data@node-2", 3: "books"}
    run.write_summary(settings=FederationSettings(), adapter_bytes=100, encoder_bytes=10**6)
    # each ledger copy is one partner's, byte for byte, and verifies against the head the summary recorded
    for node, name in ((1, "data"), (2, "data@node-2"), (3, "books")):
        copy = run.ledger_path(name)
        assert copy.read_bytes() == (tmp_path / f"partner-{node}.jsonl").read_bytes()
        found = ledger.summary_entry(copy)
        assert found and found[0] == name
        check = ledger.verify(copy, head=ledger.recorded_head(copy))
        assert check.ok and check.lines == 2, check.problems
    report = build_report(run.root)
    assert report["verified"] and sorted(p["partner"] for p in report["partners"]) == ["books", "data", "data@node-2"]
    assert {p["partner"]: p["quality"][-1]["test_ndcg@10"] for p in report["partners"]} == pytest.approx(
        {"books": 0.3, "data": 0.1, "data@node-2": 0.2}
    )


def test_a_restarted_supernode_takes_its_name_back() -> None:
    """A SuperNode that restarts registers with a new node id: alone with its name, it keeps it."""
    strategy = PartnerFedAvg()
    for rnd, node in ((1, 1), (2, 9)):
        strategy.configure_train(rnd, ArrayRecord(SENT), ConfigRecord({}), grid=_Grid())  # type: ignore[arg-type]
        strategy.aggregate_train(rnd, [reply(node, train_content(name="books"))])
        assert [r.partner for r in strategy.finish_round(rnd).train] == ["books"]


class _Grid:
    """The grid's one call that ``configure_train`` makes here (its messages are not sent)."""

    def get_node_ids(self) -> list[int]:
        return [1, 2, 3, 4]
