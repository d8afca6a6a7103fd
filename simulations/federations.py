"""Running federations for the experiment scripts, and reading their results back.

Every run is the real ServerApp + ClientApp in Flower's simulation engine
(:func:`simulations.runner.simulate`); a run folder that exists is resumed.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from client import partner
from client.finetune import finetune as partner_finetune
from client.private_state import PartnerState, read_kept_adapter, scored_head
from server.run_folder import RunFolder
from shared.data.split import DomainSplit
from shared.evaluation import evaluate, popularity_scorer
from shared.federation.adapter import initial_adapter
from shared.federation.scenario import PartnerSpec
from shared.federation.settings import FederationSettings
from shared.model.recommender import DomainModel
from shared.training import DomainRun, TrainConfig, evaluate_model, train
from simulations.runner import simulate


def final_metrics(run: Path) -> dict[str, dict[str, Any]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = max(r["round"] for r in rows)
    out = {}
    for r in rows:
        if r["round"] == last:
            out[r["partner"]] = {"ndcg@10": r["test_ndcg@10"], "recall@10": r["test_recall@10"], "epsilon": r.get("epsilon")}
    # epsilon: the last value each partner reported (a partner not sampled in the last round keeps its earlier one)
    for r in rows:
        if r.get("epsilon") is not None and r["partner"] in out:
            out[r["partner"]]["epsilon"] = r["epsilon"]
    return out


def federated_model(run: Path, name: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """Partner ``name``'s model after the run, as it was scored: the adapter it kept after the last
    round (the global adapter, or with personal-mix its mix of it) and its private head (with
    calibrate-prior, its prior's weight scaled by the kept factor)."""
    if not (run / "config.json").is_file():
        raise FileNotFoundError(f"{run}: not a run folder (no config.json)")
    folder = run / "partners" / name
    if not folder.is_dir():
        found = sorted(p.name for p in (run / "partners").glob("*") if p.is_dir())
        raise FileNotFoundError(f"{run}: no partner {name!r} took part in this run (partners: {found})")
    kept, meta = read_kept_adapter(folder)
    last = RunFolder(run).last_round()
    if kept is None or meta.get("round") != str(last):
        raise ValueError(f"{folder}: no adapter kept after the run's last round ({last}); was the run's evaluation cut short?")
    return kept, scored_head(PartnerState.load(folder).head, meta)


def other_users(spec: PartnerSpec) -> tuple[partner.PartnerData, DomainSplit]:
    """A cold partner's whole domain (its data, catalogue vectors included) and the domain's users
    after its ``max-users``, whom it never saw: the inductive model is scored on them too."""
    if not spec.max_users:
        raise ValueError(f"partner {spec.name!r} has no max-users, so its domain has no other users")
    whole = partner.partner_data(PartnerSpec(spec.name, spec.data, data_format=spec.data_format), max_len=partner.HEAD.max_len)
    return whole, whole.split.select_users(slice(spec.max_users, None))


def scenario_file(specs: list[PartnerSpec], path: Path) -> Path:
    """Writes a scenario file of ``specs`` (each partner's name, data folder and limits) to ``path``;
    :func:`shared.federation.scenario.load_scenario` reads back the same specs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for spec in specs:
        lines += ["[[partner]]", f"name = {json.dumps(spec.name)}", f"data = {json.dumps(str(spec.data))}"]
        for key, value in (
            ("data-format", spec.data_format),
            ("max-users", spec.max_users),
            ("max-epsilon", spec.max_epsilon),
            ("max-delta", spec.max_delta),
            ("privacy-account", spec.account and str(spec.account)),
        ):
            if value is not None:
                lines.append(f"{key} = {json.dumps(value)}")
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def one_partner_scenario(spec: PartnerSpec, folder: Path) -> Path:
    return scenario_file([spec], folder / f"{spec.name}.toml")


def federate(name: str, scenario: Path, n: int, base: dict[str, Any], out: Path, **overrides: Any) -> dict[str, dict[str, Any]]:
    config = {
        **base,
        "scenario": str(scenario.resolve()),
        "runs-dir": str(out.resolve()),
        "run-id": name,
        "min-partners": min(n, 2),
        **overrides,
    }
    started = time.monotonic()
    run = simulate(config, partners=n)
    print(f"[{name}] {time.monotonic() - started:.0f} s")
    return final_metrics(run)


def test_row(spec: PartnerSpec, model: DomainModel) -> dict[str, Any]:
    """A model's test NDCG@10 and Recall@10 on the partner's own users, as a table row (no epsilon)."""
    return metrics_row(evaluate_model(DomainRun(partner.partner_data(spec, max_len=partner.HEAD.max_len).split, model), "test"))


def metrics_row(m: dict[str, float]) -> dict[str, Any]:
    """NDCG@10 and Recall@10 of one evaluation, as a table row (no epsilon: without DP)."""
    return {"ndcg@10": m["ndcg@10"], "recall@10": m["recall@10"], "epsilon": None}


def zero_shot(spec: PartnerSpec, settings: FederationSettings) -> dict[str, Any]:
    """The untrained model: the initial adapter (near cosine-preserving), identity head,
    no prior; it ranks items by text similarity to the last one. What training adds
    is measured from here."""
    data = partner.partner_data(spec, max_len=partner.HEAD.max_len)
    arrays = initial_adapter(settings, in_dim=int(data.vectors.shape[1]))
    return test_row(spec, partner.build_model(settings, data, adapter_arrays=arrays, head=None))


def popularity(spec: PartnerSpec, *, users: DomainSplit | None = None) -> dict[str, Any]:
    """The other training-free baseline beside :func:`zero_shot`: every user gets the items the
    partner's training sequences hold most often (exact counts: not private, like ``local``).
    Scored on the partner's own test users, or on ``users`` (a split of the same catalogue)."""
    own = partner.partner_data(spec, max_len=partner.HEAD.max_len).split
    scored = own if users is None else users
    if scored.n_items != own.n_items:
        raise ValueError(f"partner {spec.name!r}: {scored.n_items} items to score against its catalogue of {own.n_items}")
    return metrics_row(evaluate(popularity_scorer(own), scored, "test", max_len=partner.HEAD.max_len))


def recipe_alone(spec: PartnerSpec, settings: FederationSettings, *, config: TrainConfig) -> DomainModel:
    """``fedxrec train``'s recipe on one partner's data alone, from the federation's
    initial adapter, without DP: head and adapter, full softmax, exact popularity
    prior, learning-rate halving and early stopping on valid NDCG@10."""
    data = partner.partner_data(spec, max_len=partner.HEAD.max_len)
    arrays = initial_adapter(settings, in_dim=int(data.vectors.shape[1]))
    exact = torch.as_tensor(data.split.item_popularity())  # exact counts: this model is never sent
    model = partner.build_model(settings, data, adapter_arrays=arrays, head=None, counts=exact, leave_one_out=False)
    train([DomainRun(data.split, model)], config, log=lambda _: None)
    return model


def finetune_partners(
    run: Path, specs: list[PartnerSpec], config: TrainConfig, *, mode: str = "recipe", seeds: int = 1
) -> dict[str, dict[str, Any]]:
    """``fedxrec finetune`` on each partner's state folder of ``run``: its final federated model
    (the global adapter it kept, its private head and prior), then ``mode``'s training
    (``seeds`` > 1: that many, kept as a seed ensemble when it wins on valid); test NDCG@10
    and Recall@10 per partner. Each partner's result is kept in ``run/finetuned/<name>/metrics.json``
    (what ``fedxrec finetune`` writes, with what was asked); one asked the same way is read, not retrained."""
    asked = json.loads(json.dumps({"mode": mode, "seeds": seeds, "config": dataclasses.asdict(config)}))  # as read back
    out = {}
    for spec in specs:
        folder = run / "finetuned" / spec.name
        kept = folder / "metrics.json"
        tuned = json.loads(kept.read_text()) if kept.is_file() else {}
        if tuned.get("asked") != asked:
            tuned = partner_finetune(
                state_dir=run / "partners" / spec.name,
                data=spec.data,
                out=folder,
                config=config,
                domain=spec.name,
                max_users=spec.max_users,
                mode=mode,
                seeds=seeds,
                log=lambda _: None,
            )
            kept.write_text(json.dumps({**tuned, "asked": asked}, indent=2))
        out[spec.name] = metrics_row(tuned["fine-tuned"]["test"])
    return out
