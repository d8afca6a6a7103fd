"""``fedxrec privacy plan | verify | report | account``: the privacy officer's commands."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from shared.checks import listed
from shared.cli import finite_float
from shared.federation.scenario import ACCOUNT_FILE
from shared.federation.settings import FederationSettings
from shared.privacy.accounting import ACCOUNTANTS

# What a partner with the federation's default settings releases in round 1.
DEFAULT_COUNTS_NOISE = FederationSettings.popularity_noise if FederationSettings.popularity_prior else 0.0


class PlanUsageError(ValueError):
    pass


def cmd_plan(args: argparse.Namespace) -> int:
    from shared.privacy.accounting import plan, schedule_from_users

    by_rate = args.sample_rate is not None or args.steps is not None
    by_users = any(x is not None for x in (args.users, args.batch_size, args.local_epochs))
    problems = []
    if by_rate == by_users:
        problems.append("give either --sample-rate Q --steps S, or the run's terms --users N --batch-size B --rounds R --local-epochs E")
    if by_rate and (args.sample_rate is None or args.steps is None):
        problems.append("--sample-rate and --steps go together")
    if by_users and None in (args.users, args.batch_size, args.local_epochs):
        problems.append("--users, --batch-size and --local-epochs go together (with --rounds, default 1)")
    if args.counts_noise < 0:
        problems.append(f"--counts-noise must be >= 0 (0: no item-count release), got {args.counts_noise}")
    if args.epsilon <= 0:
        problems.append(f"--epsilon must be > 0, got {args.epsilon}")
    if args.sample_rate is not None and not 0 < args.sample_rate <= 1:
        problems.append(f"--sample-rate must be in (0, 1], got {args.sample_rate}")
    for flag in ("steps", "users", "batch_size", "local_epochs", "rounds"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            problems.append(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    delta = args.delta
    if delta is None and args.users:
        delta = 1.0 / (10 * args.users)
    if delta is None:
        problems.append("--delta is needed (with --users it defaults to 1 / (10 N))")
    elif not 0 < delta < 1:
        problems.append(f"--delta must be in (0, 1), got {delta}")
    if problems:
        raise PlanUsageError(listed(problems, several="problems with the flags"))
    assert delta is not None
    if by_users:
        rate, steps = schedule_from_users(users=args.users, batch_size=args.batch_size, rounds=args.rounds, local_epochs=args.local_epochs)
    else:
        rate, steps = args.sample_rate, args.steps
    result = plan(
        epsilon=args.epsilon,
        delta=delta,
        sample_rate=rate,
        steps=steps,
        rounds=args.rounds,
        accountant=args.accountant,
        counts_noise=args.counts_noise,
    )
    out: dict[str, Any] = {
        "noise_multiplier": result.noise_multiplier,
        "epsilon": result.epsilon,
        "target_epsilon": args.epsilon,
        "delta": delta,
        "sample_rate": rate,
        "steps": steps,
        "rounds": args.rounds,
        "steps_per_round": steps // args.rounds,
        "accountant": args.accountant,
        "counts_noise": result.counts_noise,
        "counts_release_skipped": result.counts_noise != args.counts_noise,
        "epsilon_per_round": result.per_round,
        "noise_multiplier_by_accountant": result.multipliers,
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(
        f"target epsilon {args.epsilon:g} at delta {delta:.3g}; Poisson sample rate {rate:.6g}; {steps} steps ({steps // args.rounds} per round)"
    )
    if result.counts_noise > 0:
        print(f"round 1 also releases item counts at noise multiplier {result.counts_noise:g} (one Gaussian step, sensitivity 1 per user)")
    elif args.counts_noise > 0:
        print(
            f"no item-count release: at noise multiplier {args.counts_noise:g} it would spend over half of epsilon "
            f"{args.epsilon:g}, so partners skip it (and train without the popularity prior)"
        )
    print(f"noise multiplier ({args.accountant}): {result.noise_multiplier:.4f}  -> epsilon {result.epsilon:.4f} (never above the target)")
    others = ", ".join(f"{k} {v:.4f}" for k, v in result.multipliers.items() if k != args.accountant)
    print(f"(the multiplier each accountant alone would pick: {args.accountant} {result.noise_multiplier:.4f}, {others})")
    print(f"\nepsilon after each round with noise multiplier {result.noise_multiplier:.4f}:")
    print(f"{'round':>6} " + " ".join(f"{name:>10}" for name in ACCOUNTANTS))
    for r in range(args.rounds):
        print(f"{r + 1:>6} " + " ".join(f"{result.per_round[name][r]:>10.4f}" for name in ACCOUNTANTS))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from shared.privacy import ledger

    path = Path(args.ledger)
    head = _head(args, path)
    result = ledger.verify(path, head=head)
    if not result.ok:
        for problem in result.problems:
            print(f"FAILED: {problem}")
        return 1
    print(f"{path}: OK: {result.lines} lines, hash chain intact, every epsilon recomputed from its events (last {result.epsilon:.4f})")
    print(f"head: {result.lines} lines, {result.head}" + ("" if head else "  (keep this to detect removal of lines at the end later)"))
    if head is None:
        print(
            "no recorded head was given (--head LINES:HASH) or found in the run's summary.json: removal of lines at the end cannot be ruled out"
        )
    return 0


def _head(args: argparse.Namespace, path: Path) -> Any:
    from shared.privacy import ledger

    if args.head:
        return ledger.Head(*_parse_head(args.head, printed_by="verify"))
    return ledger.recorded_head(path)


def _parse_head(text: str, *, printed_by: str) -> tuple[int, str]:
    lines, _, digest = text.partition(":")
    if not lines.isdigit() or len(digest) != 64:
        raise ValueError(f"--head {text!r}: expected LINES:SHA256 (as 'fedxrec privacy {printed_by}' prints it)")
    return int(lines), digest


def cmd_report(args: argparse.Namespace) -> int:
    from shared.privacy.report import build_report, unreleased_note, write_report

    source = Path(args.source)
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such run folder or ledger file")
    head = _head(args, source) if source.is_file() else None
    report = build_report(source, head=head, account_path=Path(args.account) if args.account else None)
    out = Path(args.out) if args.out else (source if source.is_dir() else source.parent) / "privacy-report"
    paths = write_report(report, out)
    for p in report["partners"]:
        state = "verified" if p["verified"] else "VERIFICATION FAILED"
        print(
            f"{p['partner']:<24} epsilon {p['epsilon']:.4f} of {p['budget_epsilon'] if p['budget_epsilon'] is not None else 'n/a'} "
            f"({_crosscheck(p['independent_epsilon'])}); "
            f"rounds joined {len(p['rounds_joined'])}, declined {len(p['rounds_declined'])}; {state}"
        )
        life = p.get("lifetime")
        if life and "epsilon" in life:
            cap = life["cap"]
            print(
                f"{'':<24} lifetime epsilon {life['epsilon']:.4f}"
                + (f" of cap {cap:g}" if cap is not None else " (no cap)")
                + f" over {len(life['runs'])} run(s) in {life['account']}"
                + (f"; this run is {', '.join(life['this_run'])} there" if life["this_run"] else "")
            )
            if lost := unreleased_note(life["reserved_not_released"]):
                print(f"{'':<24} reserved in the account, in no line of this ledger: {lost}")
            _warn_if_the_integral_differs(life, whose="account", what="lifetime epsilon", prefix=f"{'':<24} ")
        _warn_if_the_integral_differs(p, whose="ledger", prefix=f"{'':<24} ")
        for problem in p["problems"]:
            print(f"{'':<24} FAILED: {problem}")
    if report["released_nothing"]:
        print(f"released nothing in this run (no ledger; trained in no round): {', '.join(report['released_nothing'])}")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0 if report["verified"] else 1


def _crosscheck(independent: dict[str, float]) -> str:
    """The figures recomputed without Opacus, as one line's part (0 where nothing was released)."""
    return ", ".join(
        f"{label} {independent.get(key, 0.0):.4f}"
        for label, key in (("integrated RDP", "integrated_rdp"), ("dp-accounting RDP", "dp_accounting_rdp"), ("PLD", "dp_accounting_pld"))
    )


def _warn_if_the_integral_differs(record: dict[str, Any], *, whose: str, what: str = "epsilon", prefix: str = "") -> None:
    """A WARNING line where the integrated RDP epsilon does not back ``record``'s (report.integration_warning)."""
    from shared.privacy.report import integration_warning

    if warning := integration_warning(record, whose=whose):
        print(f"{prefix}WARNING: integrated RDP {what} {record['independent_epsilon']['integrated_rdp']:.6f} {warning}")


def cmd_account(args: argparse.Namespace) -> int:
    from shared.privacy import account

    head = _parse_head(args.head, printed_by="account") if args.head else None
    try:
        result = account.summary(Path(args.account), head=head)
    except account.AccountError as err:
        print(f"FAILED: {err}")
        return 1
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    cap = result["cap"]
    independent = result["independent_epsilon"]
    print(f"{result['account']}: OK: {result['lines']} lines, hash chain intact, every epsilon recomputed from its events")
    print(
        f"lifetime epsilon {result['epsilon']:.4f}"
        + (f" of cap {cap:g} (left {cap - result['epsilon']:.4f})" if cap is not None else " (no cap)")
        + f" at delta {result['delta']:.3g}, {account.counting(result)}; {_crosscheck(independent)}"
    )
    _warn_if_the_integral_differs(result, whose="account")
    print(f"{'run':<32} {'rounds':>6} {'epsilon':>9}  from / to")
    for name, r in result["runs"].items():
        print(f"{name:<32} {len(r['rounds']):>6} {r['epsilon']:>9.4f}  {r['first']} / {r['last']}")
    print(f"head: {result['head']}" + ("" if head else "  (keep this to detect removal of lines at the end later)"))
    return 0


def add_privacy_commands(sub: Any) -> None:
    privacy = sub.add_parser("privacy", help="plan a privacy budget, verify a ledger, report what partners spent")
    cmds = privacy.add_subparsers(dest="privacy_command", required=True, metavar="SUBCOMMAND")

    p = cmds.add_parser("plan", help="the noise multiplier for a target epsilon, and epsilon after each round (RDP and PRV)")
    p.add_argument("--epsilon", type=finite_float, required=True, help="target epsilon over the whole run")
    p.add_argument("--delta", type=finite_float, help="target delta (default with --users: 1 / (10 N))")
    p.add_argument("--sample-rate", type=finite_float, help="Poisson sample rate Q (with --steps)")
    p.add_argument("--steps", type=int, help="DP-SGD steps over the whole run (with --sample-rate)")
    p.add_argument("--users", type=int, help="the partner's users N (with --batch-size, --local-epochs)")
    p.add_argument("--batch-size", type=int, help="expected users per step B")
    p.add_argument("--local-epochs", type=int, help="passes over the users per round E")
    p.add_argument("--rounds", type=int, default=1, help="rounds R the steps are spread over (default: 1)")
    p.add_argument("--accountant", choices=ACCOUNTANTS, default="rdp", help="whose multiplier is returned (default: rdp)")
    p.add_argument(
        "--counts-noise",
        type=finite_float,
        default=DEFAULT_COUNTS_NOISE,
        help="noise multiplier of the item-count release a partner makes in round 1 with popularity-prior = true; "
        f"0: no release (default: {DEFAULT_COUNTS_NOISE:g}, the federation's default)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=cmd_plan)

    v = cmds.add_parser("verify", help="check a ledger's hash chain and recompute its epsilon; non-zero exit naming the first bad line")
    v.add_argument("ledger", help="a ledger file: runs/<id>/ledger/<partner>.jsonl or a partner's <state-dir>/ledger.jsonl")
    v.add_argument("--head", metavar="LINES:HASH", help="where the ledger must end (default: the run's summary.json, if any)")
    v.set_defaults(handler=cmd_verify)

    r = cmds.add_parser("report", help="the privacy officer's report: report.md, report.html, report.json, ledger.csv")
    r.add_argument("source", help="a run folder (runs/<id>) or one partner's own ledger file")
    r.add_argument("--out", metavar="DIR", help="output folder (default: SOURCE/privacy-report, or beside the ledger file)")
    r.add_argument("--head", metavar="LINES:HASH", help="for a ledger file: where it must end")
    r.add_argument(
        "--account",
        metavar="FILE",
        help="for a ledger file: the partner's privacy account, to add its lifetime epsilon over every run "
        f"(default: {ACCOUNT_FILE} beside the ledger, if there)",
    )
    r.set_defaults(handler=cmd_report)

    a = cmds.add_parser(
        "account", help="a partner's privacy account over all its runs: check it, recompute it, lifetime epsilon per run and in all"
    )
    a.add_argument("account", help="the account file (the partner's node config privacy-account)")
    a.add_argument("--head", metavar="LINES:HASH", help="where the account must end at least (as this command printed it before)")
    a.add_argument("--json", action="store_true", help="print one JSON object")
    a.set_defaults(handler=cmd_account)
