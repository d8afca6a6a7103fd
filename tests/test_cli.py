"""The fedxrec command line, end to end (tiny encoder, synthetic and real data)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from shared.cli import main

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
    assert "problem(s) found" in err and "items.tsv:2: field 'text'" in err and "Traceback" not in err


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


def test_usage_errors_are_one_line(synthetic: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "--data" in capsys.readouterr().err
    assert main(["recommend", "--model", str(tmp_path), "--history", "1"]) == 2
    assert "model.json not found" in capsys.readouterr().err
