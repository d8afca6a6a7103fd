"""The privacy officer's report: what each partner spent, and why the number can be trusted.

Input: a run folder (``runs/<run-id>/``: every partner's ledger, the heads in
``summary.json``, quality per round in ``metrics.jsonl``) or one partner's own
ledger file, so that a partner can check its spending without the coordinator.

For each partner: the chain verified, the DP terms (unit, delta, accountant,
sampling, clipping norm, noise), rounds joined and declined, epsilon per round and
final, the budget left, and epsilon recomputed from the events without Opacus
(:mod:`shared.privacy.independent`: direct integration of the RDP definition, and
Google's dp-accounting, RDP and PLD) beside the project's own (Opacus).

With one partner's ledger, also its privacy account (node config
``privacy-account``; by default ``privacy-account.jsonl`` beside the ledger), if
it has one: the lifetime epsilon over every run on the partner's data, checked
and recomputed, and whether every release in this ledger is reserved there (a
run the account does not count would not be capped by it).

Outputs: ``report.md``, ``report.html`` (one self-contained page, plots inline as
SVG), ``report.json`` and ``ledger.csv``.
"""

from __future__ import annotations

import csv
import html
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

from shared.checks import is_finite_number
from shared.federation.scenario import ACCOUNT_FILE
from shared.json_files import read_json_object
from shared.privacy import account, independent, ledger

DP_UNIT = "one user: every interaction of one user in the partner's domain (user-level DP)"
PROTECTED = [
    "whether any one user is in the partner's data, and anything about that user's interactions, "
    "as far as it can be learned from the adapters the partner sent (the only thing training releases under DP; "
    "the statistics below are sent beside them without noise)",
]
CROSSCHECK_NOTE = (
    "Epsilon is recomputed from the ledger's events three ways, none of them Opacus. Direct integration: each step's Rényi "
    "divergence integrated numerically from its definition (Mironov, Talwar & Zhang 2019) on Opacus' orders and converted to "
    "epsilon by the same bound (Balle et al. 2020); with the RDP accountant it must equal the ledger's figure to rounding. "
    "Google's dp-accounting, RDP, on the same orders: at integer orders it equals the integral; at fractional orders it sums "
    "the divergence's series by the terms' magnitudes, dropping the signs of the binomial coefficients, which bounds it from "
    "above, so where the best order is fractional its figure is a little higher (and it drops an order whose series does not "
    "converge in 1,000 terms): both on the safe side. dp-accounting's PLD: a tighter numerical bound on the same events."
)
NOT_PROTECTED = [
    "the partner's item catalogue and item texts: the adapter is trained on them and they are not private in this design",
    "the approximate number of users: it follows from the sample rate, and the number of examples per round is reported "
    "(unless the partner declared a count public, node config public-users: these then follow from that count)",
    "the partner's participation: which rounds it joined or declined, and its evaluation metrics (valid/test NDCG@10, Recall@10), "
    "which are computed on its data without noise and sent to the coordinator",
    "each round's mean training loss (the metric 'loss'), the average of its DP-SGD steps' losses on the users they sampled, "
    "computed without noise and sent to the coordinator with the adapter (a partner with node config withhold-metrics = true "
    "sends neither these nor its evaluation metrics: its rows in metrics.jsonl say 'withheld')",
    "anything released outside training (for example recommendations served to users)",
]


# --------------------------------------------------------------------------- building


def _partner_report(path: Path, *, head: ledger.Head | None, quality: list[dict[str, Any]]) -> dict[str, Any]:
    check = ledger.verify(path, head=head)
    entries = check.entries
    first = entries[0] if entries else {}
    events = ledger.events_of(entries)
    delta = float(first.get("delta", 0.0)) or None
    per_round = [{"round": e["round"], "status": e["status"], "epsilon": e["epsilon"]} for e in entries]
    final = entries[-1]["epsilon"] if entries else 0.0
    budget = entries[-1]["budget_epsilon"] if entries else None
    crosscheck: dict[str, float] = {}
    if events and delta:
        crosscheck = {
            f"opacus_{first['accountant']}": check.epsilon,
            "integrated_rdp": independent.integrated_epsilon(events, delta=delta),
            "dp_accounting_rdp": independent.rdp_epsilon(events, delta=delta),
            "dp_accounting_pld": independent.pld_epsilon(events, delta=delta),
        }
    all_events = [ev for e in entries for ev in e["events"] if ev["mechanism"] == "dp-sgd"]
    counts = [ev for e in entries for ev in e["events"] if ev["mechanism"] == "item counts"]
    return {
        "partner": first.get("partner", path.stem),
        "ledger": str(path),
        "verified": check.ok,
        "problems": check.problems,
        "head": {"lines": check.lines, "hash": check.head},
        "dp_unit": DP_UNIT,
        "sampling": "Poisson (each user joins each step independently with the sample rate)",
        "accountant": first.get("accountant"),
        "delta": delta,
        "max_grad_norm": sorted({ev["max_grad_norm"] for ev in all_events}),
        "noise_multiplier": sorted({ev["noise_multiplier"] for ev in all_events}),
        "sample_rate": sorted({ev["sample_rate"] for ev in all_events}),
        "steps": sum(ev["steps"] for ev in all_events),
        "item_counts_noise": [ev["noise_multiplier"] for ev in counts],
        "rounds_joined": [e["round"] for e in entries if e["status"] == "trained"],
        "rounds_declined": [e["round"] for e in entries if e["status"] == "declined"],
        "epsilon_per_round": per_round,
        "epsilon": final,
        "budget_epsilon": budget,
        "budget_left": None if budget is None else max(0.0, budget - final),
        "independent_epsilon": crosscheck,
        "quality": quality,
        "withheld_metrics": None,  # a run folder's summary says (build_report); a ledger alone does not
        "entries": entries,  # the verified lines, as read
    }


def _score(value: Any) -> bool:
    return value is None or (is_finite_number(value) and 0 <= value <= 1)


# the fields of a metrics.jsonl row the report reads (None: a round without the figure, e.g. declined)
QUALITY_RULES: tuple[ledger.Rule, ...] = (
    *ledger.line_rules("round", "partner"),
    ("epsilon", lambda v: v is None or (is_finite_number(v) and v >= 0), "null or a finite number of at least 0"),
    ("test_ndcg@10", _score, "null or a number from 0 to 1"),
    ("valid_ndcg@10", _score, "null or a number from 0 to 1"),
)


def _quality(run: Path) -> dict[str, list[dict[str, Any]]]:
    """Per partner, per round: epsilon and test/valid NDCG@10 from the run's metrics.jsonl."""
    path = run / "metrics.jsonl"
    out: dict[str, list[dict[str, Any]]] = {}
    if not path.is_file():
        return out
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            row = json.loads(line) if line.strip() else {}
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(row, dict) or (row and not {"round", "partner"} <= set(row)):
            raise ValueError(f"{path}, line {number}: expected a JSON object with 'round' and 'partner' (one partner's round)")
        if row and (problems := ledger.rule_problems({name: row.get(name) for name, _, _ in QUALITY_RULES}, QUALITY_RULES)):
            raise ValueError(f"{path}, line {number}: " + "; ".join(problems))
        if row.get("epsilon") is not None and row.get("test_ndcg@10") is not None:
            out.setdefault(row["partner"], []).append(
                {
                    "round": row["round"],
                    "epsilon": row["epsilon"],
                    "test_ndcg@10": row["test_ndcg@10"],
                    "valid_ndcg@10": row.get("valid_ndcg@10"),
                }
            )
    return out


RELEASED_NOTHING = "Partners of this run with no ledger (they trained in no round, e.g. never sampled, so released nothing)"
RELEASE_TERMS = ("mechanism", "noise_multiplier", "sample_rate", "max_grad_norm")


def _covers(reserved: list[dict[str, Any]], released: list[dict[str, Any]]) -> bool:
    """Whether an account line's events cover a ledger line's: the same releases, with at
    least as many steps (a partner reserves its planned steps before training)."""
    return len(reserved) == len(released) and all(
        all(a[k] == b[k] for k in RELEASE_TERMS) and a["steps"] >= b["steps"] for a, b in zip(reserved, released, strict=True)
    )


def _reserved_count(released: list[dict[str, Any]], reserved: list[dict[str, Any]]) -> int:
    """How many of one round's ledger lines have an account line of their own that covers
    them (a maximum matching: a round run twice must be reserved twice)."""
    owner: dict[int, int] = {}  # account line -> the ledger line it covers

    def place(i: int, tried: set[int]) -> bool:
        for j, line in enumerate(reserved):
            if j not in tried and _covers(line["events"], released[i]["events"]):
                tried.add(j)
                if j not in owner or place(owner[j], tried):
                    owner[j] = i
                    return True
        return False

    return sum(place(i, set()) for i in range(len(released)))


def _lifetime(path: Path, *, entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The partner's privacy account checked and summed up, and the account's run(s) that
    hold every release of this ledger (a release not reserved there was not capped by it)."""
    try:
        result, lines = account.checked_summary(path)
    except account.AccountError as err:
        return {"account": str(path), "verified": False, "problems": [str(err)], "this_run": [], "reserved_not_released": []}
    # per round of this ledger that released something (a declined round released nothing; a round run again
    # after the coordinator resumed has two lines, each reserved on its own): per run, how many are reserved
    released: dict[int, list[dict[str, Any]]] = {}
    for e in entries:
        if e["events"]:
            released.setdefault(e["round"], []).append(e)
    reserved = {
        (r, run): _reserved_count(mine, [x for x in lines if x["round"] == r and x["run"] == run])
        for r, mine in released.items()
        for run in result["runs"]
    }
    problems = []
    for r, mine in released.items():
        best = max((reserved[r, run] for run in result["runs"]), default=0)
        if best == len(mine):
            continue
        if len(mine) == 1:
            problems.append(
                f"{path}: the releases of round {r} in this ledger are not reserved in the account: "
                "the account does not count them, so its lifetime epsilon understates what was spent"
            )
        else:
            problems.append(
                f"{path}: round {r} released {len(mine)} times in this ledger (run again after the coordinator "
                f"resumed), but only {best} of those releases are reserved in the account: the account does not "
                "count the rest, so its lifetime epsilon understates what was spent"
            )
    holding = [run for run in result["runs"] if released and all(reserved[r, run] == len(m) for r, m in released.items())]
    # rounds the run reserved whose release this ledger lacks: lost between the two (the partner stopped while
    # training, say), or cut from the ledger's end. The account counts them either way (it may overstate, never understate)
    lost: list[int] = []
    if len(holding) == 1:
        reservations = Counter(x["round"] for x in lines if x["run"] == holding[0])
        lost = [r for r in sorted(reservations) for _ in range(reservations[r] - len(released.get(r, [])))]
    return {**result, "verified": not problems, "problems": problems, "this_run": holding, "reserved_not_released": lost}


def build_report(source: str | Path, *, head: ledger.Head | None = None, account_path: Path | None = None) -> dict[str, Any]:
    """The report as plain data (what ``report.json`` holds). ``head`` and ``account_path``: for a
    single ledger file (``account_path`` defaults to ``privacy-account.jsonl`` beside it, if there)."""
    source = Path(source)
    if account_path is not None and source.is_dir():
        raise ValueError(
            f"{source}: a privacy account belongs to one partner; report that partner's ledger "
            f"(runs/<id>/ledger/<partner>.jsonl or its <state-dir>/ledger.jsonl) with the account"
        )
    if source.is_dir():
        paths = sorted((source / "ledger").glob("*.jsonl"))
        anchored = (source / "summary.json").is_file()
        summary = ledger.read_run_summary(source / "summary.json") if anchored else {}
        # each file's partner and entry in summary.json
        found = [ledger.summary_entry(path, summary=summary) if anchored else None for path in paths]
        # a partner the summary says trained (or records a ledger for) without its ledger file: that
        # partner's record of what it spent is missing; one that trained in no round released nothing
        seen = {f[0] for f in found if f}
        silent: list[str] = []
        for name, entry in summary.get("partners", {}).items():
            if name in seen:
                continue
            if entry.get("ledger_head") is None and entry.get("rounds_trained", 0) == 0:
                silent.append(name)
            else:
                paths.append(source / (entry.get("ledger_file") or f"ledger/{name}.jsonl"))
                found.append((name, entry))
        if not paths:
            raise FileNotFoundError(f"{source}: no ledger/*.jsonl: not a run folder with DP, or no round finished")
        quality = _quality(source)
        partners = [_partner_report(path, head=ledger.head_in(entry), quality=[]) for path, entry in zip(paths, found, strict=True)]
        for entry, p in zip(found, partners, strict=True):
            if entry:  # the run's name for it: the coordinator's, or kept apart where two nodes gave one name
                p["partner"] = entry[0]
            p["quality"] = quality.get(p["partner"], [])
            p["withheld_metrics"] = bool(entry[1].get("withheld")) if entry else None
        config_path = source / "config.json"
        config = read_json_object(config_path, what="the run's resolved config") if config_path.is_file() else {}
        kind, title = "run", source.name
        names = ledger.names_line(summary.get("partner_names") or {})
    else:
        partners = [_partner_report(source, head=head, quality=[])]
        config, kind, title, anchored = {}, "ledger", source.name, head is not None
        names, silent = "", []
        if account_path is None and (source.parent / ACCOUNT_FILE).is_file():
            account_path = source.parent / ACCOUNT_FILE
        if account_path is not None:
            partners[0]["lifetime"] = _lifetime(account_path, entries=partners[0]["entries"])
            partners[0]["verified"] = partners[0]["verified"] and partners[0]["lifetime"]["verified"]
            partners[0]["problems"] = [*partners[0]["problems"], *partners[0]["lifetime"]["problems"]]
    return {
        "source": str(source),
        "kind": kind,
        "title": title,
        "config": {
            k: config.get(k)
            for k in ("rounds", "local-epochs", "batch-size", "target-epsilon", "delta", "max-grad-norm", "accountant")
            if k in config
        },
        "anchored": anchored,
        "partner_names": names,  # a run's only: who named its partners
        "released_nothing": sorted(silent),  # a run's partners with no ledger: they trained in no round
        "verified": all(p["verified"] for p in partners),
        "protected": PROTECTED,
        "not_protected": NOT_PROTECTED,
        "partners": partners,
    }


# --------------------------------------------------------------------------- plots


def _svg_plots(partner: dict[str, Any]) -> list[tuple[str, str]]:
    """(caption, inline SVG) for the partner's epsilon per round, and quality against epsilon."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.fonttype"] = "none"  # text stays text in the page
    plots = []
    rounds = partner["epsilon_per_round"]
    if rounds:
        fig, ax = plt.subplots(figsize=(5.5, 3.2))
        ax.plot([r["round"] for r in rounds], [r["epsilon"] for r in rounds], marker="o", label="epsilon spent")
        declined = [r for r in rounds if r["status"] == "declined"]
        if declined:
            ax.scatter(
                [r["round"] for r in declined], [r["epsilon"] for r in declined], marker="x", color="red", zorder=3, label="declined"
            )
        if partner["budget_epsilon"] is not None:
            ax.axhline(partner["budget_epsilon"], color="gray", linestyle="--", label=f"budget {partner['budget_epsilon']:g}")
        ax.set(xlabel="round", ylabel="epsilon", title=f"{partner['partner']}: epsilon after each round")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.legend(loc="lower right", fontsize=8)
        plots.append((f"Epsilon spent by {partner['partner']} after each round", _svg(fig)))
        plt.close(fig)
    if partner["quality"]:
        q = partner["quality"]
        fig, ax = plt.subplots(figsize=(5.5, 3.2))
        ax.plot([r["epsilon"] for r in q], [r["test_ndcg@10"] for r in q], marker="o")
        for r in q:
            ax.annotate(f"r{r['round']}", (r["epsilon"], r["test_ndcg@10"]), fontsize=7, textcoords="offset points", xytext=(3, 3))
        ax.set(xlabel="epsilon spent", ylabel="test NDCG@10", title=f"{partner['partner']}: quality against epsilon")
        plots.append((f"Test NDCG@10 of {partner['partner']} against the epsilon spent", _svg(fig)))
        plt.close(fig)
    return plots


def _svg(fig: Any) -> str:
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight")
    text = buffer.getvalue()
    return text[text.index("<svg") :]  # drop the XML prologue and doctype: inline SVG


# --------------------------------------------------------------------------- writing


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "n/a" if x is None else format(x, spec)


def _terms(p: dict[str, Any]) -> list[tuple[str, str]]:
    ind = p["independent_epsilon"]
    return [
        ("ledger", f"{p['ledger']} ({p['head']['lines']} lines, head {p['head']['hash'][:16]}…)"),
        ("chain and epsilon verified", "yes" if p["verified"] else "NO: " + "; ".join(p["problems"])),
        ("DP unit", p["dp_unit"]),
        ("delta", _fmt(p["delta"], ".3g")),
        ("accountant", str(p["accountant"])),
        (
            "sampling",
            p["sampling"] + (f"; sample rate {', '.join(format(x, '.4g') for x in p['sample_rate'])}" if p["sample_rate"] else ""),
        ),
        ("clipping norm", ", ".join(format(x, "g") for x in p["max_grad_norm"]) or "n/a"),
        ("noise multiplier", ", ".join(format(x, ".4g") for x in p["noise_multiplier"]) or "n/a"),
        ("DP-SGD steps", str(p["steps"])),
        (
            "item counts released",
            "once, Gaussian mechanism, sensitivity 1 per user, noise multiplier "
            + ", ".join(format(x, "g") for x in p["item_counts_noise"])
            + " (the popularity prior's input; counted in epsilon)"
            if p["item_counts_noise"]
            else "none",
        ),
        ("rounds joined", ", ".join(map(str, p["rounds_joined"])) or "none"),
        ("rounds declined", ", ".join(map(str, p["rounds_declined"])) or "none"),
        ("epsilon spent", _fmt(p["epsilon"])),
        ("budget", _fmt(p["budget_epsilon"], "g")),
        ("budget left", _fmt(p["budget_left"])),
        ("loss and quality metrics (sent without noise)", _withheld(p["withheld_metrics"])),
        ("epsilon by direct integration, RDP", _integrated(p, whose="ledger")),
        ("epsilon by dp-accounting, RDP", _fmt(ind.get("dp_accounting_rdp"))),
        ("epsilon by dp-accounting, PLD", _fmt(ind.get("dp_accounting_pld"))),
    ]


def _withheld(withheld: bool | None) -> str:
    if withheld is None:
        return "not known from a ledger alone (the run's summary says)"
    return "withheld by the partner (node config withhold-metrics)" if withheld else "sent each round: not covered by epsilon"


def _integrated(record: dict[str, Any], *, whose: str) -> str:
    """``record``'s integrated RDP epsilon and, where ``record`` counts by RDP, whether it equals its own figure."""
    value = record["independent_epsilon"].get("integrated_rdp")
    if value is None or record["accountant"] != "rdp":
        return _fmt(value)
    same = f"equals the {whose}'s to 1e-6"
    return f"{value:.4f} ({integration_warning(record, whose=whose) or same})"


def integration_warning(record: dict[str, Any], *, whose: str) -> str:
    """Empty, or why the integrated RDP epsilon does not back ``record``'s recorded RDP epsilon: a
    partner's (``whose="ledger"``) or its privacy account's lifetime (``whose="account"``,
    :func:`shared.privacy.account.summary`)."""
    return independent.integral_disagreement(
        record["independent_epsilon"].get("integrated_rdp"),
        recorded=record["epsilon"],
        accountant=record["accountant"],
        recorded_by=f"the {whose}'s",
    )


def unreleased_note(rounds: list[int]) -> str:
    """Why a run's account can hold more than its ledger: rounds reserved, then lost before their release."""
    if not rounds:
        return ""
    which = ", ".join(map(str, rounds))
    return (
        f"round{'s' if len(rounds) > 1 else ''} {which}: lost between the reservation and the release (the partner "
        "stopped while training, say: then nothing of it was sent), unless lines were cut from this ledger's end "
        "(--head rules that out); the account counts it either way"
    )


def _lifetime_terms(p: dict[str, Any]) -> list[tuple[str, str]]:
    """Rows for the partner's privacy account over all runs (empty without one)."""
    life = p.get("lifetime")
    if life is None:
        return []
    if "epsilon" not in life:  # the account itself did not verify
        return [("privacy account", life["account"]), ("account verified", "NO: " + "; ".join(life["problems"]))]
    cap, ind = life["cap"], life["independent_epsilon"]
    runs = ", ".join(f"{name} ({len(r['rounds'])} rounds, epsilon {r['epsilon']:.4f})" for name, r in life["runs"].items())
    return [
        ("privacy account", f"{life['account']} ({life['lines']} lines, head {life['head']})"),
        ("account verified", "yes" if life["verified"] else "NO: " + "; ".join(life["problems"])),
        ("this ledger's releases are reserved there as run", ", ".join(life["this_run"]) or "n/a (nothing released)"),
        ("reserved there, released in no line of this ledger", unreleased_note(life["reserved_not_released"]) or "none"),
        ("runs on this data", runs),
        ("lifetime epsilon (every run, one account)", f"{life['epsilon']:.4f} at delta {life['delta']:.3g}, {account.counting(life)}"),
        ("lifetime cap", "none" if cap is None else f"{cap:g} (left {max(0.0, cap - life['epsilon']):.4f})"),
        (
            "lifetime epsilon by direct integration, RDP "
            + ("at the account's order" if life["order"] is not None else "at the best order"),
            _integrated(life, whose="account"),
        ),
        ("lifetime epsilon by dp-accounting, RDP / PLD", f"{ind['dp_accounting_rdp']:.4f} / {ind['dp_accounting_pld']:.4f}"),
    ]


def to_markdown(report: dict[str, Any]) -> str:
    lines = [f"# Privacy report: {report['title']}", "", f"Source: `{report['source']}`. " + _verdict(report), ""]
    if report["config"]:
        lines += ["Run settings: " + ", ".join(f"{k} {v}" for k, v in report["config"].items()), ""]
    if report["partner_names"]:
        lines += [f"Partner names: {report['partner_names']}.", ""]
    if report["released_nothing"]:
        lines += [f"{RELEASED_NOTHING}: {', '.join(report['released_nothing'])}.", ""]
    lines += ["## What is protected", "", *[f"- {x}" for x in report["protected"]], "", "## What is not protected", ""]
    lines += [*[f"- {x}" for x in report["not_protected"]], "", "## The independent check", "", CROSSCHECK_NOTE, ""]
    for p in report["partners"]:
        lines += [f"## Partner {p['partner']}", "", "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in _terms(p)], ""]
        lines += ["| round | status | epsilon after the round |", "|---|---|---|"]
        lines += [f"| {r['round']} | {r['status']} | {r['epsilon']:.4f} |" for r in p["epsilon_per_round"]]
        lines.append("")
        if life := _lifetime_terms(p):
            lines += ["### Over every run on this data (the partner's privacy account)", "", "| | |", "|---|---|"]
            lines += [*[f"| {k} | {v} |" for k, v in life], ""]
    return "\n".join(lines)


def _verdict(report: dict[str, Any]) -> str:
    if not report["verified"]:
        return "**Verification FAILED for at least one ledger (see below).**"
    anchor = (
        "against the recorded heads" if report["anchored"] else "(no recorded head given: removal of lines at the end cannot be ruled out)"
    )
    return f"Every ledger's hash chain and every recorded epsilon verified {anchor}."


def to_html(report: dict[str, Any]) -> str:
    e = html.escape
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>Privacy report: {e(report['title'])}</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:60em;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .5em;text-align:left;vertical-align:top}"
        "figure{margin:1em 0}figcaption{font-size:.9em;color:#555}.bad{color:#b00;font-weight:bold}svg{max-width:100%;height:auto}</style>",
        "</head><body>",
        f"<h1>Privacy report: {e(report['title'])}</h1>",
        f"<p>Source: <code>{e(report['source'])}</code>. {'<span class=bad>' if not report['verified'] else ''}{e(_verdict(report).replace('**', ''))}"
        f"{'</span>' if not report['verified'] else ''}</p>",
    ]
    if report["config"]:
        parts.append("<p>Run settings: " + e(", ".join(f"{k} {v}" for k, v in report["config"].items())) + "</p>")
    if report["partner_names"]:
        parts.append(f"<p class='names'>Partner names: {e(report['partner_names'])}.</p>")
    if report["released_nothing"]:
        parts.append(f"<p class='released-nothing'>{e(RELEASED_NOTHING)}: {e(', '.join(report['released_nothing']))}.</p>")
    parts.append("<h2>What is protected</h2><ul>" + "".join(f"<li>{e(x)}</li>" for x in report["protected"]) + "</ul>")
    parts.append("<h2>What is not protected</h2><ul>" + "".join(f"<li>{e(x)}</li>" for x in report["not_protected"]) + "</ul>")
    parts.append(f"<h2>The independent check</h2><p>{e(CROSSCHECK_NOTE)}</p>")
    for p in report["partners"]:
        slug = "".join(c if c.isalnum() else "-" for c in p["partner"])
        parts.append(f"<section class='partner' id='partner-{e(slug)}' data-partner='{e(p['partner'])}'>")
        parts.append(f"<h2>Partner {e(p['partner'])}</h2><table>")
        parts += [f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in _terms(p)]
        parts.append("</table><table><tr><th>round</th><th>status</th><th>epsilon after the round</th></tr>")
        parts += [f"<tr><td>{r['round']}</td><td>{e(r['status'])}</td><td>{r['epsilon']:.4f}</td></tr>" for r in p["epsilon_per_round"]]
        parts.append("</table>")
        if life := _lifetime_terms(p):
            parts.append("<h3>Over every run on this data (the partner's privacy account)</h3><table class='lifetime'>")
            parts += [f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in life]
            parts.append("</table>")
        for caption, svg in _svg_plots(p):
            parts.append(f"<figure class='plot'>{svg}<figcaption>{e(caption)}</figcaption></figure>")
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_csv(report: dict[str, Any], path: Path) -> None:
    columns = [
        "partner",
        "seq",
        "round",
        "status",
        "mechanism",
        "noise_multiplier",
        "sample_rate",
        "steps",
        "max_grad_norm",
        "epsilon",
        "delta",
        "accountant",
        "examples",
        "prev",
    ]
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for p in report["partners"]:
            for entry in p["entries"]:  # the verified prefix: a broken ledger's bad lines are not tabulated
                events = entry["events"] or [{k: "" for k in ledger.EVENT_FIELDS}]
                for ev in events:
                    writer.writerow(
                        [
                            entry["partner"],
                            entry["seq"],
                            entry["round"],
                            entry["status"],
                            *(ev[k] for k in ledger.EVENT_FIELDS),
                            entry["epsilon"],
                            entry["delta"],
                            entry["accountant"],
                            entry["examples"],
                            entry["prev"],
                        ]
                    )


def write_report(report: dict[str, Any], out: str | Path) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.md", out / "report.html", out / "report.json", out / "ledger.csv"]
    paths[0].write_text(to_markdown(report), encoding="utf-8")
    paths[1].write_text(to_html(report), encoding="utf-8")
    paths[2].write_text(json.dumps(report, indent=2), encoding="utf-8")
    write_csv(report, paths[3])
    return paths
