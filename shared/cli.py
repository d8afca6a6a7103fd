"""The ``fedxrec`` command.

    fedxrec data check PATH [--json]        users, items, interactions, text coverage; or every problem
    fedxrec data generate OUT               synthetic multi-domain data (the demo's default)
    fedxrec train --data PATH ... --out DIR train local or pooled, write DIR/metrics.json
    fedxrec recommend --model DIR ...       top-K items for a history
    fedxrec finetune --state-dir DIR ...    a partner's local fine-tune after the federation
    fedxrec demo [--partners N]             the quick-start job on generated data
    fedxrec partners check FILE             the coordinator's list of partners (run config partners-file)
    fedxrec privacy plan|verify|report|account   a privacy budget planned, a ledger verified, what partners spent

Bad input (a data problem, a missing folder, a wrong flag value) ends with a
message naming what is wrong and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shared.checks import ConfigError, listed
from shared.data.problems import DataError
from shared.device import DEVICES, why_no_gpu

EXIT_BAD_INPUT = 2
EXIT_BROKEN_PIPE = 141  # as a command ended by SIGPIPE (128 + 13)


class UsageError(Exception):
    """A flag's value is wrong; the message says which flag and what was expected."""


class FlagProblems:
    """Every bad flag of one command, so that one error names them all (and nothing has run yet)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, flag: str, text: str) -> None:
        self.lines.append(f"{flag} {text}")

    def build(self, cls: type, args: argparse.Namespace, *, prefix: str = "", **fixed: Any) -> Any:
        """``cls`` from its flags (:func:`add_dataclass_flags`); on bad values, records each under its flag and returns None."""
        try:
            return dataclass_from_flags(cls, args, prefix=prefix, **fixed)
        except ConfigError as err:
            self.record(err, prefix=prefix)
            return None

    def record(self, err: ConfigError, *, prefix: str = "") -> None:
        """Each problem under the flag of its field (``head.n_heads``: ``--head-n-heads``)."""
        for name, text in err.problems:
            self.add("--" + (prefix + name).replace("_", "-").replace(".", "-"), text)

    def raise_if_any(self) -> None:
        if self.lines:
            raise UsageError(listed(self.lines, several="flags are wrong"))


def finite_float(text: str) -> float:
    """A flag's number: Python's float() also reads 'nan' and 'inf', which no setting here means."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


# ---------------------------------------------------------------- dataclass flags
def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, *, prefix: str = "", skip: Sequence[str] = ()) -> None:
    """One ``--prefix-field-name`` flag per dataclass field, with the field's help string.

    Defaults are left as ``None`` so that :func:`dataclass_from_flags` only
    overrides what the user gave.
    """
    group = parser.add_argument_group(f"{cls.__name__} options")
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + (prefix + f.name).replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[operator]
        helptext = f"{f.metadata.get('help', '')} (default: {default})"
        if isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=helptext)
        elif isinstance(default, list):
            group.add_argument(flag, nargs="+", default=None, help=helptext)
        else:
            kind = type(default) if default is not None else float
            parse = finite_float if kind is float else kind
            group.add_argument(flag, type=parse, default=None, help=helptext, metavar=kind.__name__.upper())


def dataclass_from_flags(cls: type, args: argparse.Namespace, *, prefix: str = "", **fixed: Any) -> Any:
    given = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, (prefix + f.name).replace("-", "_"), None)
        if value is not None:
            given[f.name] = value
    given.update(fixed)
    return cls(**given)


# ---------------------------------------------------------------- partners
def cmd_partners_check(args: argparse.Namespace) -> int:
    from server.partner_list import load_partner_list

    partners = load_partner_list(args.file)  # a PartnerListError names every problem; main prints it
    print(f"{args.file}: OK, {len(partners.names)} partner(s), SHA-256 {partners.sha256}")
    width = max(len(name) for name in partners.names.values())
    for node, name in sorted(partners.names.items(), key=lambda item: item[1]):
        print(f"  {name:<{width}}  SuperNode {node}")
    return 0


def cmd_settings(args: argparse.Namespace) -> int:
    from shared.federation import reference

    if args.write:
        page = Path(args.write)
        text = page.read_text(encoding="utf-8")
        updated = reference.with_tables(text, where=str(page))  # a ValueError names the file; nothing is written
        if updated == text:
            print(f"{page}: settings tables already up to date")
        else:
            page.write_text(updated, encoding="utf-8")
            print(f"{page}: settings tables written")
        return 0
    print(reference.as_markdown() if args.markdown else reference.as_text())
    return 0


# ---------------------------------------------------------------- data
def cmd_data_check(args: argparse.Namespace) -> int:
    from shared.data.readers import read_domain
    from shared.data.split import split_domain

    try:
        data = read_domain(args.path, format=args.format)
    except DataError as err:
        if args.json:
            print(json.dumps({"ok": False, "problems": [p.to_dict() for p in err.problems]}, indent=2))
        else:
            print(err.summary(), file=sys.stderr)
        return EXIT_BAD_INPUT
    stats = data.stats()
    split = split_domain(data)
    stats["eval_users"] = {"valid": len(split.eval_users("valid")), "test": len(split.eval_users("test"))}
    stats["notes"] = data.notes
    if args.json:
        print(json.dumps({"ok": True, **stats}, indent=2))
        return 0
    h = stats["history_length"]
    assert isinstance(h, dict)
    print(f"{data.name}  ({data.format} format, {data.source})")
    print(f"  users         {stats['users']:>10,}")
    print(f"  items         {stats['items']:>10,}  ({stats['items_with_interactions']:,} with interactions)")
    print(f"  interactions  {stats['interactions']:>10,}  (per user: min {h['min']}, mean {h['mean']:.1f}, max {h['max']})")
    print(
        f"  text coverage {stats['text_coverage']:>10.1%}  ({stats['distinct_texts']:,} distinct texts, {stats['mean_text_chars']:.0f} chars on average)"
    )
    print(
        f"  split         {'own (from the files)' if data.has_own_split else 'leave-one-out by time'}: {len(split.eval_users('test')):,} test users"
    )
    for note in data.notes:
        print(f"  note: {note}")
    return 0


def cmd_data_generate(args: argparse.Namespace) -> int:
    from shared.data.synthetic import SyntheticConfig, generate

    problems = FlagProblems()
    config = problems.build(SyntheticConfig, args)
    problems.raise_if_any()
    for folder in generate(Path(args.out), config):
        print(folder)
    return 0


# ---------------------------------------------------------------- train / recommend
def model_and_train_configs(args: argparse.Namespace, problems: FlagProblems) -> tuple[Any, Any]:
    """The model and training settings from their flags; each bad flag is recorded in ``problems``."""
    from shared.model.adapters import LoraAdapterConfig, MoEAdapterConfig
    from shared.model.head import HeadConfig
    from shared.pipeline import ModelConfig
    from shared.training import TrainConfig

    if args.adapter == "moe":
        adapter = problems.build(MoEAdapterConfig, args, prefix="moe_", kind="moe")
    else:
        adapter = problems.build(LoraAdapterConfig, args, prefix="lora_", kind="lora")
    head = problems.build(HeadConfig, args, prefix="head_")
    train = problems.build(TrainConfig, args)
    given = {"temperature": args.temperature} if args.temperature is not None else {}
    # with a bad adapter or head flag the model is not built, but its other flags are still checked (on the defaults)
    parts = {"adapter": adapter, "head": head} if adapter is not None and head is not None else {}
    try:
        model = ModelConfig(**parts, item_ids=bool(args.item_ids), popularity_prior=not args.no_popularity_prior, **given)
    except ConfigError as err:
        problems.record(err)
        model = None
    return (model if parts else None), train


def check_device_flag(args: argparse.Namespace, problems: FlagProblems) -> None:
    if args.device == "cuda" and (missing := why_no_gpu()):
        problems.add("--device", f"cuda, but {missing}; use --device auto or cpu")


def add_device_flag(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help=f"where {what} trains and scores: auto (a CUDA GPU if this process sees one, else the CPU; default), cpu or cuda",
    )


def cmd_train(args: argparse.Namespace) -> int:
    from shared.pipeline import train_and_evaluate

    problems = FlagProblems()
    model, train = model_and_train_configs(args, problems)
    if args.seeds < 1:
        problems.add("--seeds", f"must be at least 1 (how many trainings to average), got {args.seeds}")
    for path in args.data:
        if not Path(path).is_dir():
            problems.add("--data", f"{path}: not a folder (expected a domain's data folder)")
    if args.encoder and not Path(args.encoder).is_dir():
        problems.add("--encoder", f"{args.encoder}: not a folder (expected a transformers model folder)")
    check_device_flag(args, problems)
    problems.raise_if_any()
    from shared.encoder import TextEncoder

    encoder = TextEncoder(args.encoder) if args.encoder else None
    metrics = train_and_evaluate(
        args.data, args.out, mode=args.mode, model_config=model, train_config=train, encoder=encoder, seeds=args.seeds, device=args.device
    )
    print(f"\n{'domain':<28} {'split':<6} {'NDCG@10':>8} {'Recall@10':>10} {'NDCG@50':>8} {'MRR':>8}")
    for name, m in metrics.items():
        for which in ("valid", "test"):
            r = m[which]
            print(f"{name:<28} {which:<6} {r['ndcg@10']:>8.4f} {r['recall@10']:>10.4f} {r['ndcg@50']:>8.4f} {r['mrr']:>8.4f}")
    if args.seeds > 1:
        print("(with several seeds: each domain's kept model, the ensemble or one seed; every seed's metrics in report.json)")
    print(f"\nwrote {Path(args.out) / 'metrics.json'}, {Path(args.out) / 'report.json'} and the model in {Path(args.out) / 'model'}")
    return 0


def cmd_recommend(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from shared.evaluation import pad_histories
    from shared.pipeline import load_domain_model

    if args.k < 1:
        raise UsageError(f"-k must be at least 1 (how many items to print), got {args.k}")
    loaded = load_domain_model(args.model, args.domain)
    index = {item: i for i, item in enumerate(loaded.item_ids, start=1)}
    unknown = [h for h in args.history if h not in index]
    if unknown:
        raise UsageError(
            f"--history: item id(s) {unknown[:5]} are not in this domain's catalogue ({len(index):,} items; see {Path(args.model)}/<domain>/items.tsv)"
        )
    seqs, lengths = pad_histories([np.array([index[h] for h in args.history])], loaded.max_len)
    with torch.no_grad():
        scores = loaded.scores(seqs, lengths)[0]
    if not args.include_history:
        scores[[index[h] - 1 for h in args.history]] = float("-inf")
    top = torch.topk(scores, min(args.k, len(scores)))
    rows = [
        {"rank": r + 1, "item_id": loaded.item_ids[i], "score": round(float(s), 4), "text": loaded.item_texts[i]}
        for r, (s, i) in enumerate(zip(top.values.tolist(), top.indices.tolist(), strict=True))
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            text = row["text"] if len(row["text"]) <= 100 else row["text"][:97] + "..."
            print(f"{row['rank']:>3}  {row['item_id']:<14} {row['score']:>8.3f}  {text}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from client.finetune import finetune
    from shared.training import TrainConfig

    problems = FlagProblems()
    for flag, path, what in (
        ("--state-dir", args.state_dir, "a partner's state folder (its node config state-dir)"),
        ("--data", args.data, "the partner's data folder (its node config data-path)"),
    ):
        if not Path(path).is_dir():
            problems.add(flag, f"{path}: not a folder (expected {what})")
    config = problems.build(TrainConfig, args)
    if args.max_users is not None and args.max_users < 1:
        problems.add("--max-users", f"must be at least 1, got {args.max_users}")
    if args.seeds < 1:
        problems.add("--seeds", f"must be at least 1 (how many fine-tunes to average), got {args.seeds}")
    check_device_flag(args, problems)
    problems.raise_if_any()
    out = Path(args.out)
    result = finetune(
        state_dir=Path(args.state_dir),
        data=Path(args.data),
        out=out,
        config=config,
        domain=args.domain,
        max_users=args.max_users,
        run_id=args.run_id,
        mode=args.mode,
        seeds=args.seeds,
        device=args.device,
        calibrate_as_run=args.calibrate_prior is None,  # --no-calibrate-prior: the weight as trained
    )
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    print(
        f"\n{result['domain']}: federated model (run {result['from']['run_id']!r}, round {result['from']['round']}) "
        f"and fine-tuned (mode {result['mode']}, kept: {result['kept']})"
    )
    rows = [("federated", result["federated"])]
    if result["ensemble"] is not None:
        rows += [(f"seed {s['seed']}", s) for s in result["seeds"]] + [("ensemble", result["ensemble"])]
    rows.append(("fine-tuned", result["fine-tuned"]))
    print(f"{'model':<12} {'split':<6} {'NDCG@10':>8} {'Recall@10':>10}")
    for name, metrics in rows:
        for which in ("valid", "test"):
            r = metrics[which]
            print(f"{name:<12} {which:<6} {r['ndcg@10']:>8.4f} {r['recall@10']:>10.4f}")
    print(f"\nwrote {out / 'metrics.json'} and the model in {out / 'model'} (for 'fedxrec recommend'; keep it inside the partner)")
    return 0


# ---------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    from shared.demo import run_demo

    problems = FlagProblems()
    if args.rounds < 1:
        problems.add("--rounds", f"must be at least 1, got {args.rounds}")
    if not args.epsilon > 0:  # also catches nan
        problems.add("--epsilon", f"must be above 0 (the demo runs under DP), got {args.epsilon}")
    if args.partners < 2:
        problems.add("--partners", f"must be at least 2 (a federation), got {args.partners}")
    if not args.gpus_per_partner >= 0:
        problems.add("--gpus-per-partner", f"must be at least 0 (a share of one GPU, e.g. 0.5), got {args.gpus_per_partner}")
    elif args.gpus_per_partner > 0 and (missing := why_no_gpu()):
        problems.add("--gpus-per-partner", f"{args.gpus_per_partner:g}, but {missing}; leave it at 0 to train on the CPU")
    problems.raise_if_any()  # before a SuperLink and Ray start
    return run_demo(
        out=Path(args.out), rounds=args.rounds, epsilon=args.epsilon, partners=args.partners, gpus_per_partner=args.gpus_per_partner
    )


# ---------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from shared.model.adapters import LoraAdapterConfig, MoEAdapterConfig
    from shared.model.head import HeadConfig
    from shared.training import TrainConfig

    parser = argparse.ArgumentParser(prog="fedxrec", description="Federated, privacy-preserving, cross-domain recommendation.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="check or generate data").add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    check = data.add_parser("check", help="read a domain folder, print its size or every problem found")
    check.add_argument("path", help="a domain's data folder (formats: tsv, recbole, json, or your own files with fedxrec-data.toml)")
    check.add_argument("--format", choices=["tsv", "recbole", "json", "mapped"], help="skip format detection")
    check.add_argument("--json", action="store_true", help="print one JSON object (keys users, items, interactions, ...)")
    check.set_defaults(handler=cmd_data_check)

    from shared.data.synthetic import SyntheticConfig

    gen = data.add_parser("generate", help="write synthetic multi-domain data with item text")
    gen.add_argument("out", help="folder to write one sub-folder per domain into")
    add_dataclass_flags(gen, SyntheticConfig)
    gen.set_defaults(handler=cmd_data_generate)

    train = sub.add_parser("train", help="train local (each domain alone) or pooled (all domains, one adapter); write metrics.json")
    train.add_argument("--data", action="append", required=True, metavar="PATH", help="a domain's data folder; repeat for several domains")
    train.add_argument("--out", required=True, metavar="DIR", help="output folder (metrics.json, report.json, model/)")
    train.add_argument(
        "--mode",
        choices=["local", "pooled"],
        default="local",
        help="local: one model per domain; pooled: one shared adapter over all domains (default: local)",
    )
    train.add_argument("--adapter", choices=["moe", "lora"], default="moe", help="adapter kind (default: moe)")
    train.add_argument(
        "--encoder", metavar="DIR", help="a transformers model folder (default: $FEDXREC_ENCODER or the packaged all-MiniLM-L6-v2)"
    )
    train.add_argument("--item-ids", action="store_true", help="add a private item-id residual embedding (transductive)")
    train.add_argument(
        "--no-popularity-prior",
        action="store_true",
        help="score by text alone, without the learned log(1 + training count) prior per item",
    )
    train.add_argument("--temperature", type=finite_float, help="softmax temperature on cosine scores (default: 0.07)")
    train.add_argument(
        "--seeds",
        type=int,
        default=1,
        metavar="N",
        help="train N times (seeds --seed .. --seed + N - 1) and recommend by the models' averaged scores where that has "
        "the higher valid NDCG@10 than the best one alone; N times the time (default: 1)",
    )
    add_device_flag(train, "the model")
    add_dataclass_flags(train, MoEAdapterConfig, prefix="moe-", skip=["kind"])
    add_dataclass_flags(train, LoraAdapterConfig, prefix="lora-", skip=["kind"])
    add_dataclass_flags(train, HeadConfig, prefix="head-")
    add_dataclass_flags(train, TrainConfig)
    train.set_defaults(handler=cmd_train)

    rec = sub.add_parser("recommend", help="print the top-K items for a history from a trained model")
    rec.add_argument(
        "--model", required=True, metavar="DIR", help="the model folder written by 'fedxrec train' or 'fedxrec finetune' (OUT/model)"
    )
    rec.add_argument("--domain", help="which domain's model (needed when the model has several)")
    rec.add_argument("--history", nargs="+", required=True, metavar="ITEM_ID", help="item ids, oldest first")
    rec.add_argument("-k", type=int, default=10, help="how many items (default: 10)")
    rec.add_argument("--include-history", action="store_true", help="allow items already in the history")
    rec.add_argument("--json", action="store_true", help="print a JSON list")
    rec.set_defaults(handler=cmd_recommend)

    ft = sub.add_parser(
        "finetune",
        help="a partner's local fine-tune after the federation: its federated model trained on its own data; nothing is sent",
    )
    ft.add_argument(
        "--state-dir", required=True, metavar="DIR", help="the partner's state folder (node config state-dir, or one run's); only read"
    )
    ft.add_argument("--run-id", help="which run of a deployed partner's state-dir (default: the latest that trained)")
    ft.add_argument(
        "--mode",
        choices=("best", "recipe", "continue"),
        default="best",
        help="recipe: head and adapter, fedxrec train's recipe; continue: the federation's own training, locally (adapter "
        "and prior weight, sampled softmax, the federation's item counts); best (default): both, keeping the higher valid NDCG@10",
    )
    ft.add_argument("--data", required=True, metavar="PATH", help="the partner's data folder (node config data-path)")
    ft.add_argument("--out", required=True, metavar="DIR", help="output folder (metrics.json, model/)")
    ft.add_argument("--domain", help="the domain's name (node config domain; default: the data folder's name)")
    ft.add_argument("--max-users", type=int, metavar="N", help="train on the first N users only (node config max-users)")
    ft.add_argument(
        "--seeds",
        type=int,
        default=1,
        metavar="N",
        help="fine-tune N times from the same start (seeds --seed .. --seed + N - 1) and recommend by the models' averaged "
        "scores when that has the higher valid NDCG@10 than the best one alone; N times the time (default: 1)",
    )
    add_device_flag(ft, "the fine-tune")
    add_dataclass_flags(ft, TrainConfig)
    ft.set_defaults(handler=cmd_finetune)

    demo = sub.add_parser("demo", help="the quick-start job on generated data (what 'make demo' runs)")
    demo.add_argument("--out", default="runs", help="folder for the run folder (default: runs)")
    demo.add_argument("--rounds", type=int, default=3, help="federated rounds (default: 3)")
    demo.add_argument("--epsilon", type=finite_float, default=8.0, help="each partner's privacy budget (default: 8)")
    demo.add_argument("--partners", type=int, default=3, help="simulated partners, each its own generated domain (default: 3; any number)")
    demo.add_argument(
        "--gpus-per-partner",
        type=finite_float,
        default=0.0,
        metavar="SHARE",
        help="each simulated partner's share of a GPU, where it trains (client-resources-num-gpus; 0.5: two partners per GPU; "
        "default: 0, the CPU)",
    )
    demo.set_defaults(handler=cmd_demo)

    partners = sub.add_parser("partners", help="the coordinator's list of partners (run config partners-file)").add_subparsers(
        dest="partners_command", required=True, metavar="SUBCOMMAND"
    )
    check_list = partners.add_parser(
        "check", help="read a list of partners as a run would: print each name and its SuperNode, or every problem with its line"
    )
    check_list.add_argument("file", help="the TOML list: [partners] then name = \"node id\" as 'flwr supernode register' printed it")
    check_list.set_defaults(handler=cmd_partners_check)

    settings = sub.add_parser(
        "settings", help="every run setting ([tool.flwr.app.config]) and partner setting (--node-config), its default and use"
    )
    shown = settings.add_mutually_exclusive_group()
    shown.add_argument("--markdown", action="store_true", help="as two Markdown tables (docs/federation.md holds them)")
    shown.add_argument(
        "--write",
        metavar="PAGE",
        help="write the two tables into this Markdown page, between its settings reference markers, and nothing else (make docs)",
    )
    settings.set_defaults(handler=cmd_settings)

    from shared.privacy.cli import add_privacy_commands

    add_privacy_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = int(args.handler(args))
        sys.stdout.flush()  # here, so that a reader that stopped early is met below, not at exit
        return code
    except BrokenPipeError:
        # the reader stopped early (`| head`): not an error of ours; Python's exit flush goes to /dev/null
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except DataError as err:
        print(err.summary(), file=sys.stderr)
    except (UsageError, ValueError, FileNotFoundError, NotADirectoryError) as err:
        if os.environ.get("FEDXREC_DEBUG"):  # the traceback, for us
            raise
        print(f"fedxrec {args.command}: error: {err}", file=sys.stderr)
    return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
