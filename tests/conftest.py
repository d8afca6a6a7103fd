"""Shared fixtures: a tiny random encoder, small synthetic domains, the real data, Ray's environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shared.data.synthetic import SyntheticConfig, generate
from shared.encoder import make_tiny_encoder
from tests.processes import adopt_orphans

REAL_DATA = Path(os.environ.get("FEDXREC_REAL_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # Never write into the user's ~/.cache from a test.
    monkeypatch.setenv("FEDXREC_CACHE", str(tmp_path_factory.getbasetemp() / "fedxrec-cache"))


@pytest.fixture(scope="session")
def real_data() -> Path:
    """``../shared/data`` beside the checkout, or $FEDXREC_REAL_DATA.

    Skipped where absent, except under $FEDXREC_REQUIRE_REAL_DATA (CI sets it), where that fails.
    """
    if not REAL_DATA.is_dir():
        message = f"real data not found at {REAL_DATA} (put ../shared beside the checkout or set FEDXREC_REAL_DATA)"
        if os.environ.get("FEDXREC_REQUIRE_REAL_DATA"):
            pytest.fail(message)
        pytest.skip(message)
    return REAL_DATA


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide random BERT with its tokenizer: fast stand-in for MiniLM."""
    return make_tiny_encoder(tmp_path_factory.mktemp("tiny-encoder"))


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three small synthetic domains in the tsv format."""
    return generate(tmp_path_factory.mktemp("synthetic"), SyntheticConfig(users=120, items=60, seed=1))


@pytest.fixture
def simulation_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    """For a test that runs federations through ``flwr run`` (``simulations.runner.simulate``): every
    process they start stays this process's descendant, even one whose parent exits first, so the
    test's leak check sees it; Ray's log lines are not merged."""
    adopt_orphans()
    monkeypatch.setenv("RAY_DEDUP_LOGS", "0")


@pytest.fixture
def books_and_games(tmp_path: Path) -> Path:
    """A scenario file of two partners, books and games, whose data folders exist (and are empty)."""
    lines = []
    for name in ("books", "games"):
        (tmp_path / name).mkdir()
        lines += ["[[partner]]", f'name = "{name}"', f'data = "{name}"', ""]
    scenario = tmp_path / "two.toml"
    scenario.write_text("\n".join(lines))
    return scenario


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The ``gpu`` tests run only when ``-m`` names them (``make test-gpu``): not in ``make test``, CI, or ``-m "not slow"``."""
    if "gpu" in (config.getoption("markexpr") or ""):
        return
    deselected = [item for item in items if item.get_closest_marker("gpu")]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A ``gpu`` test fails at once, saying why, where this process sees no CUDA GPU."""
    if item.get_closest_marker("gpu"):
        from shared.device import why_no_gpu

        missing = why_no_gpu()
        if missing:
            pytest.fail(f"these tests need a CUDA GPU: {missing}")
