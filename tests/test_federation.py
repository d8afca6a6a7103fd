"""The ClientApp's replies (wire contract), private state across restarts, budgets."""

from __future__ import annotations

import dataclasses
import json
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client import partner
from client.client_app import STATE_KEY, evaluate, train
from client.finetune import federated_start
from client.private_state import PRIOR_SCALE, PartnerState, newest_state, read_kept_adapter, scored_head
from server.rounds import round_rows
from server.run_folder import RunFolder
from server.strategy import PartnerReply, RoundLog
from shared.federation import wire
from shared.federation.adapter import initial_adapter
from shared.federation.scenario import synthetic_scenario
from shared.federation.settings import FederationSettings, SettingsError, settings_from_run_config
from shared.model.adapters import MoEAdapter
from shared.privacy import account, ledger
from shared.privacy.report import build_report, to_markdown
from shared.training import PRIOR_SCALES

ENCODER_DIM = 384


@pytest.fixture(autouse=True)
def _task_identity() -> Iterator[None]:
    # Flower stamps messages with the running task's identity; a test is its own task.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield


def settings_for(tmp_path: Path, **overrides: object) -> FederationSettings:
    values: dict[str, object] = {"runs_dir": str(tmp_path), "run_id": "test", "rounds": 2, "batch_size": 128, **overrides}
    return FederationSettings(**values)  # type: ignore[arg-type]


def message(kind: str, arrays: dict[str, torch.Tensor], settings: FederationSettings, server_round: int) -> Message:
    config = ConfigRecord({**settings.to_run_config(), "server-round": server_round})
    return Message(content=RecordDict({wire.ARRAYS: ArrayRecord(arrays), wire.CONFIG: config}), dst_node_id=1, message_type=kind)


def context(partition: int = 0, state: RecordDict | None = None) -> Context:
    return Context(
        run_id=1, node_id=1, node_config={"partition-id": partition, "num-partitions": 3}, state=state or RecordDict(), run_config={}
    )


@pytest.mark.slow
def test_every_reply_holds_exactly_the_declared_records(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    arrays = initial_adapter(settings, in_dim=ENCODER_DIM)
    expected = {k: tuple(v.shape) for k, v in arrays.items()}
    ctx = context()
    for server_round in (1, 2, 3):  # round 3 is beyond the plan: declined, and still well-formed
        reply = train(message(MessageType.TRAIN, arrays, settings, server_round), ctx)
        content = reply.content
        assert set(content.keys()) == {wire.ARRAYS, wire.METRICS, wire.PARTNER}
        sent = content[wire.ARRAYS].to_torch_state_dict()
        assert {k: tuple(v.shape) for k, v in sent.items()} == expected
        assert all(v.dtype == torch.float32 for v in sent.values())
        assert set(content[wire.METRICS].keys()) == set(wire.TRAIN_METRICS)
        assert set(content[wire.PARTNER].keys()) == set(wire.PARTNER_FIELDS)
        metrics = dict(content[wire.METRICS])
        assert metrics["declined"] == (1 if server_round == 3 else 0)
        if server_round == 3:
            assert "declined round 3" in content[wire.PARTNER]["note"]
            assert all(torch.equal(sent[k], arrays[k]) for k in arrays)  # nothing new is released
        else:
            assert metrics["steps"] > 0 and 0 < metrics["epsilon"] <= settings.target_epsilon * 1.011
        arrays = sent
        evaluated = evaluate(message(MessageType.EVALUATE, arrays, settings, server_round), ctx)
        assert set(evaluated.content.keys()) == {wire.METRICS, wire.PARTNER}
        assert set(evaluated.content[wire.METRICS].keys()) == set(wire.EVALUATE_METRICS)
    # nothing private travels: the head and the ledger are only in the state folder
    folder = tmp_path / "test" / "partners" / "books"
    assert (folder / "state.pt").is_file()
    check = ledger.verify(folder / "ledger.jsonl")
    assert check.ok and [e["status"] for e in check.entries] == ["trained", "trained", "declined"]


@pytest.mark.slow
def test_a_restarted_partner_keeps_its_spent_epsilon(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, rounds=3, popularity_prior=True)  # its item-count release must compose too
    arrays = initial_adapter(settings, in_dim=ENCODER_DIM)
    first = train(message(MessageType.TRAIN, arrays, settings, 1), context())
    spent = dict(first.content[wire.METRICS])["epsilon"]
    # a new process: empty Context.state, same state folder
    second = train(message(MessageType.TRAIN, first.content[wire.ARRAYS].to_torch_state_dict(), settings, 2), context())
    metrics = dict(second.content[wire.METRICS])
    assert metrics["epsilon"] > spent
    state = PartnerState.load(tmp_path / "test" / "partners" / "books")
    counts, *training = state.accountant["history"]  # the prior's item counts, released once in round 1
    assert counts == [settings.popularity_noise, 1.0, 1]
    assert state.last_round == 2 and sum(h[2] for h in training) == 2 * metrics["steps"]
    # and a Context.state newer than the folder wins within a process
    ctx = context(state=RecordDict({STATE_KEY: ConfigRecord({"blob": state.to_bytes()})}))
    assert newest_state(ctx.state[STATE_KEY]["blob"], tmp_path / "nowhere").last_round == 2  # type: ignore[arg-type]


@pytest.mark.slow
def test_a_round_run_again_after_the_coordinator_stopped_leaves_both_ledgers_verifiable(tmp_path: Path) -> None:
    """The coordinator stops after a partner's round-2 reply, before round 2 ends; resumed, it runs round 2 again."""
    settings = settings_for(tmp_path, rounds=3)
    found = partner.resolve_partner({"partition-id": 0, "num-partitions": 3}, settings)
    kept = tmp_path / "account.jsonl"  # the partner's privacy account across runs, without a cap
    spec = partner.PartnerSpec(found.name, found.data, account=kept)
    folder, run = tmp_path / "partner", RunFolder(tmp_path / "run")
    first, state = partner.train(
        settings=settings,
        server_round=1,
        spec=spec,
        arrays=initial_adapter(settings, in_dim=ENCODER_DIM),
        state=PartnerState(),
        folder=folder,
    )
    assert run.copy_ledger(spec.name, first.ledger) == ""  # round 1 ended
    lost, _ = partner.train(settings=settings, server_round=2, spec=spec, arrays=first.arrays, state=state, folder=folder)
    again, _ = partner.train(
        settings=settings, server_round=2, spec=spec, arrays=first.arrays, state=PartnerState.load(folder), folder=folder
    )
    assert again.metrics["epsilon"] > lost.metrics["epsilon"] > first.metrics["epsilon"]  # both releases of round 2 count
    own = ledger.verify(folder / "ledger.jsonl")
    assert own.ok and [e["round"] for e in own.entries] == [1, 2, 2], own.problems
    # the lost reply's line reaches the run's copy with the next reply, before that reply's own line
    assert run.copy_ledger(spec.name, again.ledger) == ""
    assert run.ledger_path(spec.name).read_bytes() == (folder / "ledger.jsonl").read_bytes()
    assert ledger.verify(run.ledger_path(spec.name)).ok
    # each release of round 2 was reserved in the privacy account before training: the report finds both
    assert [x["round"] for x in account.read(kept)] == [1, 2, 2]
    life = build_report(folder / "ledger.jsonl", account_path=kept)["partners"][0]["lifetime"]
    assert life["verified"] and life["this_run"] == [settings.run_id], life["problems"]
    # a ledger that does not continue the copy (another partner's, under this name) is not copied
    copy = run.ledger_path(spec.name).read_bytes()
    note = run.copy_ledger(spec.name, again.ledger.replace(f'"partner": "{spec.name}"', '"partner": "other"'))
    assert note.startswith(f"its privacy ledger does not begin with the 3 line(s) of the run's copy ledger/{spec.name}.jsonl")
    assert run.ledger_path(spec.name).read_bytes() == copy


@pytest.mark.slow
def test_a_partner_declining_its_first_round_spends_nothing_on_its_item_counts(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, popularity_prior=True)
    spec = partner.resolve_partner({"partition-id": 0, "num-partitions": 3}, settings)
    state = PartnerState(noise_multiplier=0.05)  # a round this noisy cannot fit epsilon 8
    reply, after = partner.train(
        settings=settings, server_round=1, spec=spec, arrays=initial_adapter(settings, in_dim=ENCODER_DIM), state=state, folder=tmp_path
    )
    assert reply.metrics["declined"] == 1 and reply.metrics["epsilon"] == 0.0
    assert after.accountant in (None, {}) or not after.accountant.get("history")  # the counts were never used: not recorded
    entry = ledger.verify(tmp_path / "ledger.jsonl").entries[-1]
    assert entry["status"] == "declined" and entry["events"] == []


@pytest.mark.slow
def test_a_state_trained_without_dp_is_refused_by_a_dp_round(tmp_path: Path) -> None:
    plain = settings_for(tmp_path, dp=False)
    spec = partner.resolve_partner({"partition-id": 0, "num-partitions": 3}, plain)
    arrays = initial_adapter(plain, in_dim=ENCODER_DIM)
    _, state = partner.train(settings=plain, server_round=1, spec=spec, arrays=arrays, state=PartnerState(), folder=tmp_path)
    assert state.trained_without_dp
    restarted = PartnerState.load(tmp_path)  # e.g. a SuperNode reusing its state-dir for a DP run
    with pytest.raises(ValueError, match=r"trained without DP .* fresh state folder"):
        partner.train(settings=settings_for(tmp_path), server_round=2, spec=spec, arrays=arrays, state=restarted, folder=tmp_path)


@pytest.mark.slow
def test_a_state_folder_holds_one_run(tmp_path: Path) -> None:
    first = settings_for(tmp_path, run_id="first")
    spec = partner.resolve_partner({"partition-id": 0, "num-partitions": 3}, first)
    arrays = initial_adapter(first, in_dim=ENCODER_DIM)
    folder = tmp_path / "state"
    _, state = partner.train(settings=first, server_round=1, spec=spec, arrays=arrays, state=PartnerState(), folder=folder)
    assert PartnerState.load(folder).run_id == "first"
    # resuming the same run goes on; another run reusing the folder (a SuperNode's state-dir) is refused,
    # before it could write round 1 after round 1 into the ledger
    _, state = partner.train(settings=first, server_round=2, spec=spec, arrays=arrays, state=PartnerState.load(folder), folder=folder)
    second = settings_for(tmp_path, run_id="second")
    for call in (
        lambda: partner.train(settings=second, server_round=1, spec=spec, arrays=arrays, state=state, folder=folder),
        lambda: partner.evaluate_global(settings=second, server_round=1, spec=spec, arrays=arrays, state=state, folder=folder),
    ):
        with pytest.raises(ValueError, match=r"belongs to run 'first'.* this is run 'second'.* its own folder"):
            call()
    check = ledger.verify(folder / "ledger.jsonl")
    assert check.ok and [e["round"] for e in check.entries] == [1, 2]


@pytest.mark.slow
def test_a_partner_cap_below_the_server_target_binds(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, target_epsilon=8.0)
    spec = partner.resolve_partner({"partition-id": 1, "num-partitions": 3}, settings)
    capped = partner.PartnerSpec(spec.name, spec.data, max_epsilon=1.0)
    arrays = initial_adapter(settings, in_dim=ENCODER_DIM)
    state = PartnerState()
    for server_round in (1, 2):
        reply, state = partner.train(
            settings=settings, server_round=server_round, spec=capped, arrays=arrays, state=state, folder=tmp_path / "capped"
        )
        assert reply.metrics["epsilon"] <= 1.0 * 1.011
    assert reply.metrics["epsilon"] > 0.9


@pytest.mark.slow
def test_a_partner_can_withhold_the_statistics_no_epsilon_covers(tmp_path: Path) -> None:
    """Node config withhold-metrics: the loss and the quality metrics go as WITHHELD (same keys), the
    partner keeps them in its state folder, and the server records them as withheld, not as figures."""
    settings = settings_for(tmp_path)
    found = partner.resolve_partner({"partition-id": 0, "num-partitions": 3}, settings)
    spec = dataclasses.replace(found, withhold_metrics=True)
    folder, arrays = tmp_path / "shop", initial_adapter(settings, in_dim=ENCODER_DIM)
    reply, state = partner.train(settings=settings, server_round=1, spec=spec, arrays=arrays, state=PartnerState(), folder=folder)
    scores = partner.evaluate_global(settings=settings, server_round=1, spec=spec, arrays=reply.arrays, state=state, folder=folder)
    assert set(reply.metrics) == set(wire.TRAIN_METRICS) and set(scores) == set(wire.EVALUATE_METRICS)
    sent = {**reply.metrics, **scores}
    assert {name: sent[name] for name in wire.WITHHELD_METRICS} == dict.fromkeys(wire.WITHHELD_METRICS, wire.WITHHELD)
    assert reply.metrics["steps"] > 0 and 0 < reply.metrics["epsilon"] <= settings.target_epsilon * 1.011  # DP-covered: sent
    kept = [json.loads(line) for line in (folder / partner.OWN_METRICS).read_text().splitlines()]
    assert [sorted(k) for k in kept] == [["loss", "round"], ["round", "test-ndcg@10", "test-recall@10", "valid-ndcg@10", "valid-recall@10"]]
    assert kept[0]["loss"] > 0 and all(0 <= kept[1][name] <= 1 for name in wire.WITHHELD_METRICS if name != "loss")

    log = RoundLog(
        train=[PartnerReply(node_id=7, partner=spec.name, note="", metrics=reply.metrics)],
        evaluate=[PartnerReply(node_id=7, partner=spec.name, note="", metrics=scores)],
    )
    (row,) = round_rows(1, log)
    assert row["withheld"] and all(row[name.replace("-", "_")] is None for name in wire.WITHHELD_METRICS)
    assert row["epsilon"] == reply.metrics["epsilon"] and row["steps"] == reply.metrics["steps"]
    # a first round declined (a capped partner, a run without DP) is the first thing written in a fresh folder
    capped = dataclasses.replace(spec, max_epsilon=4.0)
    declined, _ = partner.train(
        settings=settings_for(tmp_path, dp=False), server_round=1, spec=capped, arrays=arrays, state=PartnerState(), folder=tmp_path / "new"
    )
    assert declined.metrics["declined"] == 1 and declined.metrics["loss"] == wire.WITHHELD
    assert (tmp_path / "new" / partner.OWN_METRICS).is_file()

    run = RunFolder(tmp_path / "run")
    run.append_metrics([row])
    summary = run.write_summary(settings=settings, adapter_bytes=100, encoder_bytes=10**6)
    assert summary["partners"][spec.name]["withheld"] and "test_ndcg@10" not in summary["partners"][spec.name]
    assert f"| {spec.name} | withheld | withheld | withheld | {row['epsilon']:.3f} |" in (run.root / "summary.md").read_text()


@pytest.mark.slow
def test_a_privacy_account_caps_every_run_on_the_data_together(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, rounds=1, target_epsilon=4.0)
    spec = partner.resolve_partner({"partition-id": 1, "num-partitions": 3}, settings)
    capped = partner.PartnerSpec(spec.name, spec.data, max_epsilon=5.0, account=tmp_path / "account.jsonl")
    arrays = initial_adapter(settings, in_dim=ENCODER_DIM)
    replies = {}
    for run in ("first", "second", "third"):  # each run its own state folder, as a coordinator would start them
        run_settings = settings_for(tmp_path, rounds=1, target_epsilon=4.0, run_id=run)
        replies[run], _ = partner.train(
            settings=run_settings, server_round=1, spec=capped, arrays=arrays, state=PartnerState(), folder=tmp_path / run
        )
    first, second, third = (replies[r] for r in ("first", "second", "third"))
    assert first.metrics["epsilon"] == pytest.approx(4.0, rel=0.011)
    # two runs at the first's noise would spend 5.3: the second's noise is raised to fit
    # what the first left of 5, and the third finds too little left to train usefully
    assert second.metrics["noise-multiplier"] > first.metrics["noise-multiplier"] and second.metrics["epsilon"] < 4.0
    assert (
        "what is left of this partner's lifetime epsilon 5 over 2 run(s)"
        in ledger.verify(tmp_path / "second" / "ledger.jsonl").entries[0]["note"]
    )
    assert third.metrics["declined"] == 1 and third.arrays is arrays
    assert "too little is left of this partner's lifetime epsilon 5 over 3 run(s)" in third.note
    entries = account.read(tmp_path / "account.jsonl")
    assert [x["run"] for x in entries] == ["first", "second"]
    assert 4.9 < entries[-1]["epsilon"] <= 5.0 and entries[-1]["epsilon"] == pytest.approx(
        account.terms(entries, delta=1.0).spent_on(account.events_of(entries))
    )
    # the privacy officer's report of the second run's ledger finds that run in the account
    report = build_report(tmp_path / "second" / "ledger.jsonl", account_path=tmp_path / "account.jsonl")
    life = report["partners"][0]["lifetime"]
    assert report["verified"] and life["verified"] and life["this_run"] == ["second"]
    assert life["epsilon"] == entries[-1]["epsilon"] and list(life["runs"]) == ["first", "second"]
    assert f"| {life['epsilon']:.4f} (equals the account's to 1e-6) |" in to_markdown(report)  # the integral backs it


@pytest.mark.slow
def test_a_coordinators_non_finite_adapter_is_refused_before_anything_is_spent(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    spec = partner.resolve_partner({"partition-id": 0, "num-partitions": 3}, settings)
    with_account = partner.PartnerSpec(spec.name, spec.data, max_epsilon=8.0, account=tmp_path / "account.jsonl")
    arrays = initial_adapter(settings, in_dim=ENCODER_DIM)
    arrays["experts.weight"][0, 0] = float("nan")  # one NaN would reach every partner through the average
    for run in (partner.train, partner.evaluate_global):
        with pytest.raises(ValueError, match=r"the server's arrays: not weights of this adapter .* experts.weight: 1 non-finite"):
            run(settings=settings, server_round=1, spec=with_account, arrays=arrays, state=PartnerState(), folder=tmp_path / "state")
    # no ledger line, no reservation in the lifetime account, no state, no kept adapter
    assert not (tmp_path / "state").exists() and not (tmp_path / "account.jsonl").exists()


@pytest.mark.slow
def test_a_capped_partner_declines_a_run_without_dp(tmp_path: Path) -> None:
    plain = settings_for(tmp_path, dp=False)
    spec = partner.resolve_partner({"partition-id": 0, "num-partitions": 3}, plain)
    capped = partner.PartnerSpec(spec.name, spec.data, max_epsilon=8.0)
    arrays = initial_adapter(plain, in_dim=ENCODER_DIM)
    reply, state = partner.train(settings=plain, server_round=1, spec=capped, arrays=arrays, state=PartnerState(), folder=tmp_path)
    assert reply.metrics["declined"] == 1 and reply.arrays is arrays and state.head is None
    assert "trains without DP (dp = false)" in reply.note and "caps its epsilon at 8" in reply.note
    assert not (tmp_path / "state.pt").exists()


@pytest.mark.slow
def test_a_partner_declines_a_delta_above_its_max(tmp_path: Path) -> None:
    # a coordinator asking for delta 0.1 would let a "DP" release reveal about one user in ten in the clear
    settings = settings_for(tmp_path, delta=0.1)
    spec = partner.resolve_partner({"partition-id": 0, "num-partitions": 3}, settings)
    arrays = initial_adapter(settings, in_dim=ENCODER_DIM)
    reply, state = partner.train(settings=settings, server_round=1, spec=spec, arrays=arrays, state=PartnerState(), folder=tmp_path)
    assert reply.metrics["declined"] == 1 and reply.arrays is arrays and state.head is None
    assert "delta 0.1 is above this partner's max-delta" in reply.note
    stricter = partner.PartnerSpec(spec.name, spec.data, max_delta=1e-6)  # the partner's own, below the default 1 / users
    reply, _ = partner.train(
        settings=settings_for(tmp_path, run_id="next"),
        server_round=1,
        spec=stricter,
        arrays=arrays,
        state=PartnerState(),
        folder=tmp_path / "next",
    )
    assert reply.metrics["declined"] == 1 and "above this partner's max-delta 1e-06" in reply.note


@pytest.mark.slow
def test_a_partner_that_declares_its_user_count_public_sends_nothing_that_follows_from_its_real_count(tmp_path: Path) -> None:
    """Under DP the sample rate, the steps, the default delta and the example counts a partner sends
    follow from its number of users, which adding or removing one user changes: with public-users they
    follow from the declared count. Two partners of 300 and 340 users, both declaring 320."""
    settings = settings_for(tmp_path, batch_size=64, local_epochs=1)
    found = partner.resolve_partner({"partition-id": 0, "num-partitions": 3}, settings)
    arrays = initial_adapter(settings, in_dim=ENCODER_DIM)

    def sent(users: int, public: int | None) -> tuple[dict[str, float], dict[str, float], dict[str, object]]:
        spec = partner.PartnerSpec(found.name, found.data, max_users=users, public_users=public)
        folder = tmp_path / f"{users}-{public}"
        reply, state = partner.train(settings=settings, server_round=1, spec=spec, arrays=arrays, state=PartnerState(), folder=folder)
        scored = partner.evaluate_global(settings=settings, server_round=1, spec=spec, arrays=reply.arrays, state=state, folder=folder)
        line = {k: v for k, v in json.loads(reply.ledger.splitlines()[-1]).items() if k not in ("time", "prev")}
        return {k: v for k, v in reply.metrics.items() if k != "loss"}, scored, line

    small, large = sent(300, 320), sent(340, 320)
    assert small[0] == large[0] and small[2] == large[2]  # every training figure and the ledger line alike
    assert small[0]["sample-rate"] == 1 / 5 and small[0]["steps"] == 5 and small[0]["num-examples"] == 320
    assert small[0]["delta"] == pytest.approx(1 / 3200) and small[1]["num-examples"] == large[1]["num-examples"] == 320
    undeclared_small, undeclared_large = sent(300, None)[0], sent(340, None)[0]  # without it they differ
    assert undeclared_small["sample-rate"] != undeclared_large["sample-rate"] and undeclared_small["delta"] != undeclared_large["delta"]


def test_run_config_errors_name_every_key() -> None:
    with pytest.raises(SettingsError) as info:
        settings_from_run_config(
            {
                "round": 3,
                "lr": "fast",
                "fraction-train": 1.5,
                "adapter": "lora",
                "optimizer": "adam",
                "proximal-mu": -0.5,
                "moe-dim": 127,
                "round-timeout": 0.0,
                "partners-timeout": -1.0,
            }
        )
    text = str(info.value)
    assert "round-timeout must be > 0, got 0.0" in text and "partners-timeout must be > 0, got -1.0" in text
    assert "moe-dim must be a multiple of 2 (each partner's head attends over the adapter's output with 2 heads), got 127" in text
    assert "proximal-mu must be >= 0 (0: plain FedAvg), got -0.5" in text
    assert "optimizer must be 'adamw' or 'sgd', got 'adam'" in text
    assert "unknown run-config key 'round'; did you mean 'rounds'?" in text
    assert "'lr': expected a finite number, got 'fast'" in text
    assert "fraction-train must be in (0, 1]" in text
    assert "adapter must be 'moe'" in text
    # a partner keeps each run's state in <state-dir>/runs/<run-id>: a coordinator cannot steer it elsewhere
    with pytest.raises(SettingsError, match=r"run-id must be letters, digits.*got '\.\./\.\./etc'"):
        settings_from_run_config({"run-id": "../../etc"})
    # TOML, and so flwr run's --run-config, reads nan and inf: a NaN budget would make every partner decline every round
    nan, inf = float("nan"), float("inf")
    with pytest.raises(SettingsError) as info:
        settings_from_run_config({"target-epsilon": nan, "max-grad-norm": inf, "lr": -1.0})
    assert str(info.value).splitlines()[1:] == [
        "  run-config key 'target-epsilon': expected a finite number, got nan",
        "  run-config key 'max-grad-norm': expected a finite number, got inf",
        "  lr must be > 0, got -1.0",
    ]


def test_pyproject_run_config_lists_every_setting_with_the_code_default() -> None:
    """`flwr run .` reads [tool.flwr.app.config], fedxrec's own commands the dataclass: the two must not drift."""
    import tomllib

    pyproject = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text(encoding="utf-8"))
    listed = pyproject["tool"]["flwr"]["app"]["config"]
    defaults = FederationSettings().to_run_config()
    assert list(listed) == list(defaults)  # same keys, in the same order as `fedxrec settings` prints them
    assert {k: v for k, v in listed.items() if v != defaults[k] or type(v) is not type(defaults[k])} == {}


def test_default_adapter_bytes_per_round_are_under_one_percent_of_the_encoder() -> None:
    arrays = initial_adapter(FederationSettings(), in_dim=ENCODER_DIM)
    sent = sum(v.numel() * v.element_size() for v in arrays.values())
    assert sent <= 0.01 * 90_852_864  # all-MiniLM-L6-v2's float32 weights
    adapter = MoEAdapter(ENCODER_DIM, partner.adapter_config(FederationSettings()))
    assert set(arrays) == set(adapter.state_dict())


@pytest.mark.parametrize("dp", [True, False])
@pytest.mark.parametrize("trains", ["adapter", "all"])
def test_trains_decides_whether_the_head_trains_with_and_without_dp(tmp_path: Path, dp: bool, trains: str) -> None:
    settings = settings_for(tmp_path, trains=trains, dp=dp)
    arrays = initial_adapter(settings, in_dim=ENCODER_DIM)
    reply = train(message(MessageType.TRAIN, arrays, settings, 1), context())
    sent = reply.content[wire.ARRAYS].to_torch_state_dict()
    assert any(not torch.equal(sent[k], arrays[k]) for k in arrays)  # the adapter trained
    state = PartnerState.load(tmp_path / "test" / "partners" / "books")
    assert state.head is not None
    # the head's zero-initialised weights move once it trains (DP noise, or plain gradients)
    moved = [k for k in ("head.positions.weight", "head.blocks.0.attn.out.weight", "head.blocks.1.ffn_out.weight") if state.head[k].any()]
    assert moved == (
        [] if trains == "adapter" else ["head.positions.weight", "head.blocks.0.attn.out.weight", "head.blocks.1.ffn_out.weight"]
    )


@pytest.mark.parametrize("dp", [True, False])
def test_a_private_residual_trains_in_the_rounds_and_never_leaves_the_partner(tmp_path: Path, dp: bool) -> None:
    settings = settings_for(tmp_path, private_residual=True, dp=dp)
    arrays = initial_adapter(settings, in_dim=ENCODER_DIM)
    ctx = context()
    first = train(message(MessageType.TRAIN, arrays, settings, 1), ctx)
    sent = first.content[wire.ARRAYS].to_torch_state_dict()
    assert {k: v.shape for k, v in sent.items()} == {k: v.shape for k, v in arrays.items()}  # the adapter, nothing more
    folder = tmp_path / "test" / "partners" / "books"
    after_one = PartnerState.load(folder).head
    assert after_one is not None and after_one["residual.weight"].any()  # trained from its zero start
    train(message(MessageType.TRAIN, sent, settings, 2), ctx)
    after_two = PartnerState.load(folder).head
    assert after_two is not None and not torch.equal(after_two["residual.weight"], after_one["residual.weight"])  # kept, trained on
    evaluated = evaluate(message(MessageType.EVALUATE, sent, settings, 2), ctx)
    assert set(evaluated.content[wire.METRICS].keys()) == set(wire.EVALUATE_METRICS)


def test_a_stored_head_from_other_residual_settings_is_refused_by_name(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, private_residual=False, dp=False)
    arrays = initial_adapter(settings, in_dim=ENCODER_DIM)
    train(message(MessageType.TRAIN, arrays, settings, 1), context())
    head = PartnerState.load(tmp_path / "test" / "partners" / "books").head
    assert not partner.has_private_residual(head)
    spec = partner.resolve_partner({"partition-id": 0, "num-partitions": 3}, settings)
    data = partner.partner_data(spec, max_len=partner.HEAD.max_len)
    with_residual = FederationSettings(private_residual=True)
    with pytest.raises(ValueError, match=r"missing \['residual.weight'\].*\(private-residual\)"):
        partner.build_model(with_residual, data, adapter_arrays=arrays, head=head)


def test_aggregation_and_its_trim_are_validated() -> None:
    with pytest.raises(SettingsError) as info:
        settings_from_run_config({"aggregation": "krum", "trim-fraction": 0.5})
    assert str(info.value).splitlines()[1:] == [
        "  aggregation must be 'fedavg' or 'median' or 'trimmed-mean', got 'krum'",
        "  trim-fraction must be in [0, 0.5) (the fraction cut from each end), got 0.5",
    ]


def test_trains_is_validated() -> None:
    with pytest.raises(SettingsError, match="trains must be 'all' or 'adapter'"):
        settings_from_run_config({"trains": "head"})


def test_personal_mix_is_refused_under_dp_and_named_when_mistyped() -> None:
    with pytest.raises(SettingsError, match=r"personal-mix = 'valid' needs dp = false: .*outside DP-SGD.*use personal-mix = 'off'"):
        settings_from_run_config({"personal-mix": "valid", "dp": True})
    with pytest.raises(SettingsError, match=r"personal-mix must be 'off' or 'valid', got 'auto'"):
        settings_from_run_config({"personal-mix": "auto", "dp": False})


def test_a_personal_mix_keeps_the_global_weight_with_the_best_validation_ndcg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_for(tmp_path, dp=False, personal_mix="valid")
    start = initial_adapter(settings, in_dim=ENCODER_DIM)
    ctx = context()
    sent = train(message(MessageType.TRAIN, start, settings, 1), ctx).content[wire.ARRAYS].to_torch_state_dict()
    folder = tmp_path / "test" / "partners" / "books"
    state = PartnerState.load(folder)
    assert state.own_adapter is not None and all(torch.equal(state.own_adapter[k], sent[k]) for k in sent)  # kept: what it sent
    scored: list[str] = []  # which split each scoring pass of the partner was on
    ranking_metrics = partner.ranking_metrics
    monkeypatch.setattr(
        partner, "ranking_metrics", lambda model, split, which: scored.append(which) or ranking_metrics(model, split, which)
    )
    # a "global" adapter far from the partner's own: the untrained start
    evaluated = dict(evaluate(message(MessageType.EVALUATE, start, settings, 1), ctx).content[wire.METRICS])
    assert sorted(scored) == ["test"] + ["valid"] * len(partner.GLOBAL_WEIGHTS)  # each mix scored once
    train(message(MessageType.TRAIN, start, settings, 2), ctx)
    assert len(scored) == 1 + len(partner.GLOBAL_WEIGHTS)  # the next round starts from the mix its evaluation chose
    monkeypatch.undo()
    spec = partner.resolve_partner({"partition-id": 0, "num-partitions": 3}, settings)
    data = partner.partner_data(spec, max_len=partner.HEAD.max_len)
    by_weight = {}
    for w in partner.GLOBAL_WEIGHTS:
        mixed = {k: sent[k] + w * (start[k] - sent[k]) for k in sent}
        model = partner.build_model(settings, data, adapter_arrays=mixed, head=state.head).eval()
        by_weight[w] = partner.ranking_metrics(model, data.split, "valid")["ndcg@10"]
    chosen = evaluated["global-weight"]
    assert by_weight[chosen] == max(by_weight.values()) and evaluated["valid-ndcg@10"] == pytest.approx(by_weight[chosen])
    # the kept adapter (a fine-tune's start) is the mix the partner is scored with
    kept, meta, _ = federated_start(folder)
    assert meta["global-weight"] == str(chosen)
    assert all(torch.allclose(kept[k], sent[k] + chosen * (start[k] - sent[k])) for k in sent)
    # without personal-mix the partner is scored with the global adapter as it came, and keeps no own adapter
    plain = settings_for(tmp_path / "plain", dp=False)
    train(message(MessageType.TRAIN, start, plain, 1), context())
    assert PartnerState.load(tmp_path / "plain" / "test" / "partners" / "books").own_adapter is None
    assert dict(evaluate(message(MessageType.EVALUATE, start, plain, 1), context()).content[wire.METRICS])["global-weight"] == 1.0


@pytest.mark.slow
def test_calibrate_prior_scores_the_kept_model_with_the_best_factor_and_trains_on_as_before(tmp_path: Path) -> None:
    """calibrate-prior: the partner is scored (and keeps its model) with the factor on its prior's weight
    that its validation users rank best; the next round trains as it would without the setting."""
    assert settings_from_run_config({"calibrate-prior": True, "dp": True}).calibrate_prior  # scoring only: allowed under DP
    settings = settings_for(tmp_path, dp=False, calibrate_prior=True)
    spec = partner.resolve_partner({"partition-id": 0, "num-partitions": 3}, settings)
    start = initial_adapter(settings, in_dim=ENCODER_DIM)

    def two_rounds(settings: FederationSettings, folder: Path) -> tuple[dict[str, float], partner.TrainReply, PartnerState, PartnerState]:
        torch.manual_seed(0)  # the private head's untrained start (trains = "adapter") is drawn from torch's global generator
        reply, first = partner.train(settings=settings, server_round=1, spec=spec, arrays=start, state=PartnerState(), folder=folder)
        scores = partner.evaluate_global(settings=settings, server_round=1, spec=spec, arrays=reply.arrays, state=first, folder=folder)
        assert set(scores) == set(wire.EVALUATE_METRICS)  # nothing more is sent
        _, second = partner.train(settings=settings, server_round=2, spec=spec, arrays=reply.arrays, state=first, folder=folder)
        return scores, reply, first, second

    scores, reply, first, second = two_rounds(settings, tmp_path / "calibrated")
    plain_scores, _, _, plain_second = two_rounds(dataclasses.replace(settings, calibrate_prior=False), tmp_path / "plain")
    # without DP training is deterministic: round 2 trained from the weight as trained, not the scaled one
    assert first.head is not None and second.head is not None and plain_second.head is not None
    assert all(torch.equal(second.head[k], plain_second.head[k]) for k in plain_second.head)

    trained = first.head["popularity.weight"]
    data = partner.partner_data(spec, max_len=partner.HEAD.max_len)
    by_factor = {}
    for factor in PRIOR_SCALES:
        head = {**first.head, "popularity.weight": trained * factor}
        model = partner.build_model(settings, data, adapter_arrays=reply.arrays, head=head)
        by_factor[factor] = partner.ranking_metrics(model, data.split, "valid")["ndcg@10"]
    best = max(by_factor.values())
    kept, meta = read_kept_adapter(tmp_path / "calibrated")
    chosen = float(meta[PRIOR_SCALE])
    assert by_factor[chosen] == best and (chosen == 1.0 or by_factor[1.0] < best)  # a tie keeps the weight as trained
    assert scores["valid-ndcg@10"] == pytest.approx(best) and plain_scores["valid-ndcg@10"] == pytest.approx(by_factor[1.0])
    # the kept model (a fine-tune's start, what compare_runs scores) is the one reported
    assert kept is not None and PRIOR_SCALE not in read_kept_adapter(tmp_path / "plain")[1]
    model = partner.build_model(settings, data, adapter_arrays=kept, head=scored_head(first.head, meta))
    assert partner.ranking_metrics(model, data.split, "test")["ndcg@10"] == pytest.approx(scores["test-ndcg@10"])
    assert scored_head(first.head, {}) is first.head  # a model kept without calibrate-prior: the weight as trained


def test_a_run_folder_resumes_only_with_its_own_settings(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, dp=False)
    run = RunFolder.open(settings)
    run.write_config(settings)
    # a run begun before a key existed used that key's default: it resumes
    stored = json.loads((run.root / "config.json").read_text())
    del stored["personal-mix"]
    (run.root / "config.json").write_text(json.dumps(stored))
    run.write_config(dataclasses.replace(settings, rounds=5))  # rounds may grow
    run.write_config(dataclasses.replace(settings, rounds=5, round_timeout=60.0))  # and the server wait longer or shorter
    run.write_config(dataclasses.replace(settings, rounds=5, partners_timeout=60.0))  # for replies or for partners
    run.write_config(dataclasses.replace(settings, rounds=5, min_partners=1))  # and go on without a partner gone for good
    with pytest.raises(ValueError, match=r"exists with other settings \{'personal-mix': \('off', 'valid'\)\}"):
        run.write_config(dataclasses.replace(settings, personal_mix="valid"))
    (run.root / "config.json").write_text('{"rounds": 3,')  # cut off: a disk that filled up
    with pytest.raises(
        ValueError, match=r"config.json: not valid JSON \(Expecting property name enclosed in double quotes at line 1, column 14\)"
    ):
        run.write_config(settings)


def test_a_resume_keeps_the_manifest_it_began_with_and_refuses_other_inputs(tmp_path: Path) -> None:
    settings, data = settings_for(tmp_path / "runs"), {"books": tmp_path / "books", "games": tmp_path / "games"}
    for name, folder in data.items():
        folder.mkdir()
        (folder / "items.csv").write_text(f"item_id,text\n1,{name}\n")
    run = RunFolder.open(settings)
    run.write_manifest(settings=settings, encoder_fingerprint="e" * 64, data=data)
    began = json.loads((run.root / "manifest.json").read_text())
    assert set(began["data_fingerprints"]) == {"books", "games"} and "resumed" not in began

    run.write_manifest(settings=settings, encoder_fingerprint="e" * 64, data=data)
    run.write_manifest(settings=settings, encoder_fingerprint="e" * 64, data={"books": data["books"]})  # a partner gone: resumes
    resumed = json.loads((run.root / "manifest.json").read_text())
    assert {k: v for k, v in resumed.items() if k != "resumed"} == began  # what the run began with stays
    assert [set(r) for r in resumed["resumed"]] == [{"created", "python", "platform", "packages", "git_commit"}] * 2

    (data["games"] / "items.csv").write_text("item_id,text\n1,other games\n")
    with pytest.raises(ValueError) as refused:
        run.write_manifest(settings=settings, encoder_fingerprint="f" * 64, data=data)
    said = str(refused.value)
    assert said.startswith(f"run {run.root} began with other inputs: the encoder (fingerprint eeeeeeeeeeee... then, ffffffffffff... now)")
    assert f"the data of partner 'games' in {data['games']} (fingerprint {began['data_fingerprints']['games'][:12]}... then" in said
    assert "'books'" not in said and said.endswith("Resume it with the encoder and data it began with, or choose another run-id")
    assert json.loads((run.root / "manifest.json").read_text()) == resumed  # nothing written


def test_a_damaged_private_state_is_named_with_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "state.pt").write_bytes(b"not a state")
    with pytest.raises(ValueError, match=rf"{tmp_path / 'state.pt'}: this partner's private state cannot be read \(.*restore the file"):
        PartnerState.load(tmp_path)


def test_a_deployed_partners_failure_reaches_the_coordinator_without_its_folders(tmp_path: Path) -> None:
    settings = settings_for(tmp_path / "coordinator")
    spec = synthetic_scenario(tmp_path / "data", partners=1)[0]
    node_config = {"data-path": str(spec.data), "state-dir": str(tmp_path / "private")}
    folder = tmp_path / "private" / "runs" / settings.run_id
    folder.mkdir(parents=True)
    (folder / "state.pt").write_bytes(b"not a state")
    ctx = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})
    arrays = initial_adapter(settings, in_dim=ENCODER_DIM)
    with pytest.raises(RuntimeError) as raised:
        train(message(MessageType.TRAIN, arrays, settings, 1), ctx)
    name, said = wire.read_failure(str(raised.value))
    assert name == spec.name and said.startswith("ValueError: <state-dir>/runs/test/state.pt: this partner's private state cannot be read")
    assert str(tmp_path) not in str(raised.value)
    assert str(folder / "state.pt") in str(raised.value.__cause__)  # the partner's own log keeps where it lies
    # a node config the partner cannot use fails before it knows its name, its folders unsaid too
    del node_config["state-dir"]
    with pytest.raises(RuntimeError) as raised:
        evaluate(message(MessageType.EVALUATE, arrays, settings, 1), Context(1, 1, node_config, RecordDict(), {}))
    name, said = wire.read_failure(str(raised.value))
    assert name is None and said.startswith("ValueError: invalid node config: node config: state-dir must be")
    assert str(tmp_path) not in said


@pytest.mark.slow
def test_a_process_keeps_partners_data_within_its_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray's few actors serve every simulated partner in turn: each keeps what it prepared only up to
    $FEDXREC_PARTNER_DATA_MB, least recently used out first, and always the partner in use."""
    monkeypatch.setattr(partner, "_DATA", OrderedDict())
    spec = synthetic_scenario(tmp_path / "data", partners=1)[0]
    a, b, c = (dataclasses.replace(spec, max_users=n) for n in (40, 41, 42))  # three partners of about one size
    first = partner.partner_data(a, max_len=partner.HEAD.max_len)
    monkeypatch.setenv(partner.DATA_BUDGET_ENV, str(2.5 * first.nbytes / 2**20))  # room for two
    partner.partner_data(b, max_len=partner.HEAD.max_len)
    assert partner.partner_data(a, max_len=partner.HEAD.max_len) is first  # kept, not prepared again
    partner.partner_data(c, max_len=partner.HEAD.max_len)  # b, the least recently used, goes
    assert [key[1] for key in partner._DATA] == [40, 42]
    monkeypatch.setenv(partner.DATA_BUDGET_ENV, "0")  # only the partner in use
    partner.partner_data(b, max_len=partner.HEAD.max_len)
    assert [key[1] for key in partner._DATA] == [41]
    monkeypatch.setenv(partner.DATA_BUDGET_ENV, "lots")
    with pytest.raises(
        ValueError,
        match=r"\$FEDXREC_PARTNER_DATA_MB is 'lots': expected megabytes \(0 keeps only the partner in use\), a number of at least 0",
    ):
        partner.partner_data(c, max_len=partner.HEAD.max_len)
