"""The fedxrec command line, end to end (tiny encoder, synthetic and real data)."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from shared.cli import main
from shared.data.readers import read_domain
from shared.data.split import split_domain
from shared.demo import partner_table
from shared.encoder import TextEncoder
from shared.evaluation import pad_histories
from shared.model.head import HeadConfig
from shared.pipeline import ModelConfig, load_domain_model, save_domain_model, write_model_index
from shared.training import DomainRun, ranking_metrics

TRAIN_FAST = ["--epochs", "2", "--moe-dim", "16", "--moe-n-experts", "2", "--head-n-layers", "1", "--batch-size", "64"]
METRICS = {"recall@10", "ndcg@10", "recall@20", "ndcg@20", "recall@50", "ndcg@50", "mrr"}


def test_data_check_json_on_real_data(real_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "check", str(real_data / "amazon2014-office"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["ok"], out["users"], out["items"], out["interactions"]) == (True, 4905, 2420, 53258)
    assert out["text_coverage"] == 1.0


def test_data_check_text_on_synthetic(synthetic: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "check", str(synthetic[0])]) == 0
    out = capsys.readouterr().out
    assert "users" in out and "text coverage" in out and "leave-one-out by time" in out


def test_data_check_lists_problems_and_fails(synthetic: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(synthetic[0], broken)
    (broken / "items.tsv.gz").unlink()
    (broken / "items.tsv").write_text("ItemID\tTitle\n100\t\n100\tTwice\n", encoding="utf-8")
    assert main(["data", "check", str(broken), "--json"]) == 2
    out = json.loads(capsys.readouterr().out)
    kinds = {p["kind"] for p in out["problems"]}
    assert out["ok"] is False and {"empty text", "duplicate item id", "unknown item"} <= kinds
    assert main(["data", "check", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "problem(s) found" in err and "items.tsv:2: field 'Title'" in err and "Traceback" not in err


def test_settings_lists_every_run_and_partner_setting(capsys: pytest.CaptureFixture[str]) -> None:
    from shared.federation.scenario import NODE_CONFIG
    from shared.federation.settings import FederationSettings

    assert main(["settings"]) == 0
    out = capsys.readouterr().out
    assert all(f"\n  {key} = " in out for key in FederationSettings().to_run_config())
    assert "\n  target-epsilon = 8.0\n      epsilon each partner may spend over the whole run\n" in out
    assert all(f"\n  {key}\n" in out for key in NODE_CONFIG)
    assert main(["settings", "--markdown"]) == 0
    table = capsys.readouterr().out
    assert '| `scenario` | `"synthetic"` |' in table and "| `state-dir` |" in table and "runs/&lt;run-id&gt;/" in table


def test_settings_write_replaces_only_the_tables_and_refuses_a_page_without_markers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from shared.federation import reference

    page = tmp_path / "page.md"
    page.write_text(f"# Title\n\nbefore\n{reference.DOCS_START}\nstale table\n{reference.DOCS_END}\nafter\n", encoding="utf-8")
    assert main(["settings", "--write", str(page)]) == 0
    assert capsys.readouterr().out == f"{page}: settings tables written\n"
    written = page.read_text(encoding="utf-8")
    assert written == f"# Title\n\nbefore\n{reference.DOCS_START}\n{reference.as_markdown()}\n{reference.DOCS_END}\nafter\n"
    assert main(["settings", "--write", str(page)]) == 0
    assert "already up to date" in capsys.readouterr().out and page.read_text(encoding="utf-8") == written

    bare = tmp_path / "bare.md"
    bare.write_text("# No markers here\n", encoding="utf-8")
    assert main(["settings", "--write", str(bare)]) == 2
    err = capsys.readouterr().err
    assert str(bare) in err and reference.DOCS_START in err and "(found 0)" in err
    assert bare.read_text(encoding="utf-8") == "# No markers here\n"


def test_data_generate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "generate", str(tmp_path), "--domains", "2", "--users", "30", "--items", "20"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["books", "games"]


def test_train_then_recommend(synthetic: list[Path], tiny_encoder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    args = [
        "train",
        *(a for p in synthetic[:2] for a in ("--data", str(p))),
        "--out",
        str(out),
        "--encoder",
        str(tiny_encoder),
        *TRAIN_FAST,
    ]
    assert main([*args, "--mode", "pooled"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"books", "games"}
    for m in metrics.values():
        assert set(m) == {"valid", "test"} and set(m["test"]) == METRICS
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "pooled" and report["adapter_parameters"] == 2 * (32 * 16 + 16) + 2 * 32 + 2
    capsys.readouterr()

    item_ids = [line.split("\t")[1] for line in (out / "model" / "books" / "items.tsv").read_text().splitlines()[1:4]]
    assert main(["recommend", "--model", str(out / "model"), "--domain", "books", "--history", *item_ids, "-k", "5", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5]
    assert not {r["item_id"] for r in rows} & set(item_ids)  # history excluded by default
    assert all(r["text"] for r in rows)


def test_train_with_the_lora_adapter_pooled_then_recommend(
    synthetic: list[Path], tiny_encoder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """LoRA inside the encoder: both losses train, and the saved model recommends."""
    data = [a for p in synthetic[:2] for a in ("--data", str(p))]
    lora = [
        "--adapter",
        "lora",
        "--lora-r",
        "4",
        "--mode",
        "pooled",
        "--encoder",
        str(tiny_encoder),
        "--epochs",
        "1",
        "--head-n-layers",
        "1",
    ]
    for loss in ("sampled", "full"):
        out = tmp_path / loss
        assert main(["train", *data, "--out", str(out), *lora, "--loss", loss]) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert set(metrics) == {"books", "games"} and all(0 <= m["test"]["ndcg@10"] <= 1 for m in metrics.values())
    capsys.readouterr()
    item_ids = [line.split("\t")[1] for line in (out / "model" / "books" / "items.tsv").read_text().splitlines()[1:4]]
    assert main(["recommend", "--model", str(out / "model"), "--domain", "books", "--history", *item_ids, "-k", "5", "--json"]) == 0
    assert [r["rank"] for r in json.loads(capsys.readouterr().out)] == [1, 2, 3, 4, 5]


def test_train_local_writes_one_model_per_domain(synthetic: list[Path], tiny_encoder: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--data",
                str(synthetic[0]),
                "--data",
                str(synthetic[1]),
                "--out",
                str(out),
                "--encoder",
                str(tiny_encoder),
                *TRAIN_FAST,
                "--loss",
                "sampled",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in (out / "model").iterdir() if p.is_dir()) == ["books", "games"]


@pytest.mark.parametrize("mode", ["local", "pooled"])
def test_train_seeds_keeps_each_domains_ensemble_or_best_seed_and_each_seed_is_a_one_seed_run(
    mode: str, synthetic: list[Path], tiny_encoder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = [a for p in synthetic[:2] for a in ("--data", str(p))]
    common = ["train", *data, "--mode", mode, "--encoder", str(tiny_encoder), *TRAIN_FAST]
    out = tmp_path / "ensemble"
    assert main([*common, "--seeds", "2", "--seed", "3", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    seeds = json.loads((out / "report.json").read_text())["seeds"]
    index = json.loads((out / "model" / "model.json").read_text())
    encoder = TextEncoder(tiny_encoder)
    for path in synthetic[:2]:
        name = path.name
        run = seeds[name]
        assert [s["seed"] for s in run["seeds"]] == [3, 4]
        best = max(run["seeds"], key=lambda s: s["valid"]["ndcg@10"])
        ensemble_wins = run["ensemble"]["valid"]["ndcg@10"] >= best["valid"]["ndcg@10"]
        assert run["kept"] == ("ensemble" if ensemble_wins else f"seed {best['seed']}")
        assert metrics[name] == (run["ensemble"] if ensemble_wins else {w: best[w] for w in ("valid", "test")})
        saved = index["members"][name] if isinstance(index["members"], dict) else index["members"]
        assert saved == run["members"] == (2 if ensemble_wins else 1)
        # what 'fedxrec recommend' loads scores as metrics.json says
        loaded = load_domain_model(out / "model", name, encoder=encoder)
        split = split_domain(read_domain(path))
        assert ranking_metrics(loaded.members, split, "test") == pytest.approx(metrics[name]["test"])
    assert "kept" in capsys.readouterr().out
    # where domains keep different numbers of models, model.json holds one number per domain
    index["members"] = {name: s["members"] for name, s in seeds.items()}
    (out / "model" / "model.json").write_text(json.dumps(index))
    for name, s in seeds.items():
        assert len(load_domain_model(out / "model", name, encoder=encoder).members) == s["members"]

    # seed 4 of the ensemble is exactly what a one-seed run with --seed 4 trains
    alone = tmp_path / "seed-4"
    assert main([*common, "--seed", "4", "--out", str(alone)]) == 0
    for name, m in json.loads((alone / "metrics.json").read_text()).items():
        assert m == {w: seeds[name]["seeds"][1][w] for w in ("valid", "test")}
    assert json.loads((alone / "report.json").read_text())["seeds"] is None

    capsys.readouterr()
    assert main([*common, "--seeds", "0", "--out", str(tmp_path / "x")]) == 2
    assert "--seeds must be at least 1" in capsys.readouterr().err


def test_every_bad_flag_is_named_at_once_before_anything_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o"
    argv = ["train", "--data", str(tmp_path), "--out", str(out), "--epochs", "0", "--lr", "-1", "--head-n-heads", "3", "--seeds", "0"]
    assert main(argv) == 2
    assert capsys.readouterr().err.splitlines() == [
        "fedxrec train: error: 4 flags are wrong:",
        "  --epochs must be a whole number of at least 1, got 0",
        "  --lr must be above 0, got -1.0",
        "  --head-n-heads must divide the adapter's width, 128, got 3",
        "  --seeds must be at least 1 (how many trainings to average), got 0",
    ]
    argv = ["train", "--data", str(tmp_path), "--out", str(out), "--head-max-len", "0", "--moe-n-experts", "0", "--temperature", "-1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--moe-n-experts must be a whole number of at least 1, got 0" in err and "--head-max-len must be" in err
    assert "--temperature must be above 0, got -1.0" in err  # checked even though the adapter and head flags are wrong
    assert main(["train", "--data", str(tmp_path), "--out", str(out), "--temperature", "0"]) == 2
    assert "--temperature must be above 0, got 0.0" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"invalid ModelConfig: temperature must be above 0, got 0; head.n_heads must divide"):
        ModelConfig(head=HeadConfig(n_heads=3), temperature=0)  # the same checks from Python
    assert main(["data", "generate", str(out), "--users", "-5", "--items", "3"]) == 2
    assert "--users must be a whole number of at least 1, got -5\n  --items must be at least" in capsys.readouterr().err
    assert main(["demo", "--rounds", "0", "--epsilon", "-1", "--partners", "1", "--out", str(out)]) == 2
    assert capsys.readouterr().err.splitlines()[1:] == [
        "  --rounds must be at least 1, got 0",
        "  --epsilon must be above 0 (the demo runs under DP), got -1.0",
        "  --partners must be at least 2 (a federation), got 1",
    ]
    assert main(["finetune", "--state-dir", str(tmp_path), "--data", str(tmp_path), "--out", str(out), "--max-minutes", "-2"]) == 2
    assert "--max-minutes must be above 0, or not given for no time cap, got -2.0" in capsys.readouterr().err
    assert not out.exists()  # nothing was written, no SuperLink started


def test_usage_errors_are_one_line(synthetic: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "--data" in capsys.readouterr().err
    assert main(["recommend", "--model", str(tmp_path), "--history", "1"]) == 2
    assert "model.json not found" in capsys.readouterr().err
    assert main(["recommend", "--model", str(tmp_path), "--history", "1", "-k", "0"]) == 2
    assert "-k must be at least 1 (how many items to print), got 0" in capsys.readouterr().err
    (tmp_path / "model.json").write_text('{"domains": ["books"]}')  # not what fedxrec train writes
    assert main(["recommend", "--model", str(tmp_path), "--history", "1"]) == 2
    assert f"{tmp_path / 'model.json'}: 'encoder_fingerprint', 'model' missing: not a model's index" in capsys.readouterr().err
    # float() reads 'nan' and 'inf'; no flag here means either (an infinite budget, a NaN learning rate)
    for argv, flag, value in (
        (["train", "--data", "d", "--out", "o", "--lr", "nan"], "--lr", "nan"),
        (["privacy", "plan", "--epsilon", "inf", "--users", "9"], "--epsilon", "inf"),
    ):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        assert f"argument {flag}: expected a finite number, got '{value}'" in capsys.readouterr().err


def test_a_reader_that_stops_early_is_not_an_error() -> None:
    """`fedxrec privacy plan ... | head -1`: the pipe closes before fedxrec has written."""
    command = [
        str(Path(sys.executable).parent / "fedxrec"),
        "privacy",
        "plan",
        "--epsilon",
        "8",
        "--users",
        "1000",
        "--batch-size",
        "64",
        "--local-epochs",
        "1",
    ]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # no reader: every write fails with EPIPE
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141 and err == b"", err.decode()


def test_a_seed_ensemble_saves_each_member_and_recommends_by_their_mean(
    synthetic: list[Path], tiny_encoder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(["train", "--data", str(synthetic[0]), "--out", str(out), "--encoder", str(tiny_encoder), *TRAIN_FAST]) == 0
    encoder = TextEncoder(tiny_encoder)
    index = json.loads((out / "model" / "model.json").read_text())
    assert index["members"] == 1
    config = ModelConfig.from_dict(index["model"])
    split = split_domain(read_domain(synthetic[0]))
    first = load_domain_model(out / "model", encoder=encoder).members[0]
    second = copy.deepcopy(first)
    with torch.no_grad():
        for p in second.parameters():
            p.add_(0.1 * torch.randn_like(p))  # another member: other weights, same catalogue

    ensemble = tmp_path / "ensemble"
    save_domain_model(ensemble / "books", [DomainRun(split, first), DomainRun(split, second)], config)
    write_model_index(ensemble, mode="finetune", config=config, encoder=encoder, domains=["books"], data=[synthetic[0]], members=2)
    assert sorted(p.name for p in (ensemble / "books").iterdir()) == ["items.tsv", "member-0", "member-1"]
    loaded = load_domain_model(ensemble, encoder=encoder)
    assert len(loaded.members) == 2
    seqs, lengths = pad_histories([split.history(u, "test") for u in split.eval_users("test")[:4]], loaded.max_len)
    mean = (first.score_all(seqs, lengths) + second.score_all(seqs, lengths)) / 2
    assert torch.allclose(loaded.scores(seqs, lengths), mean, atol=1e-5)

    # save -> load -> save keeps every member's weights; a model saved over another leaves none of its weights
    again = tmp_path / "again"
    save_domain_model(again / "books", DomainRun(split, first), config)
    save_domain_model(again / "books", [DomainRun(split, m) for m in loaded.members], config)
    assert sorted(p.name for p in (again / "books").iterdir()) == ["items.tsv", "member-0", "member-1"]
    for k in (0, 1):
        for name in ("adapter.safetensors", "head.safetensors"):
            saved, resaved = (
                load_file(str(ensemble / "books" / f"member-{k}" / name)),
                load_file(str(again / "books" / f"member-{k}" / name)),
            )
            assert saved.keys() == resaved.keys() and all(torch.equal(saved[key], resaved[key]) for key in saved)

    capsys.readouterr()
    assert main(["recommend", "--model", str(ensemble), "--history", *loaded.item_ids[:3], "-k", "3", "--json"]) == 0
    top = [r["item_id"] for r in json.loads(capsys.readouterr().out)]
    history = pad_histories([np.arange(1, 4)], loaded.max_len)
    scores = (first.score_all(*history) + second.score_all(*history))[0] / 2
    scores[:3] = float("-inf")  # the history, left out by default
    assert top == [loaded.item_ids[i] for i in torch.topk(scores, 3).indices.tolist()]

    (ensemble / "books" / "member-1" / "head.safetensors").unlink()
    assert main(["recommend", "--model", str(ensemble), "--history", loaded.item_ids[0]]) == 2
    err = capsys.readouterr().err
    assert str(ensemble / "books" / "member-1" / "head.safetensors") in err and "names 2 member(s)" in err


def test_the_demo_table_lists_partners_by_name_in_aligned_columns() -> None:
    figures = {"test_ndcg@10": 0.1, "test_recall@10": 0.2, "epsilon": 7.99}
    table = partner_table({"partners": {"music-store-2": figures, "books": figures}}, epsilon=8).splitlines()
    assert [line.split()[0] for line in table] == ["partner", "books", "music-store-2"]
    assert len({line.index("0.1000") for line in table[1:]}) == 1  # a long name does not shift its row
