"""The scenario files shipped in simulations/scenarios/ load, and name data that exists."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.federation.scenario import PartnerSpec, load_scenario, supernodes_note, synthetic_scenario
from simulations.coldstart import cold_partner

SCENARIOS = sorted((Path(__file__).resolve().parents[1] / "simulations" / "scenarios").glob("*.toml"))


def test_there_are_scenarios() -> None:
    assert len(SCENARIOS) >= 6, SCENARIOS


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_a_scenario_loads_and_its_data_folders_exist(scenario: Path, real_data: Path) -> None:
    specs = load_scenario(scenario)
    assert specs and all(spec.data.is_dir() for spec in specs), [str(s.data) for s in specs if not s.data.is_dir()]
    if scenario.stem.endswith("-coldstart"):
        assert cold_partner(specs, scenario=scenario).max_users == 300


def test_a_cold_start_scenario_needs_one_smallest_partner(tmp_path: Path) -> None:
    specs = [PartnerSpec("a", tmp_path, max_users=300), PartnerSpec("b", tmp_path, max_users=300), PartnerSpec("c", tmp_path)]
    with pytest.raises(ValueError, match=r"x\.toml: .*one partner with the smallest max-users; found 2 with max-users = 300"):
        cold_partner(specs, scenario=Path("x.toml"))
    assert cold_partner([*specs[1:], PartnerSpec("d", tmp_path, max_users=4000)], scenario=Path("x.toml")).name == "b"


def test_a_simulation_whose_supernodes_do_not_match_its_scenario_is_told_what_to_run() -> None:
    assert supernodes_note(scenario="synthetic", partners=0, supernodes=2) is None  # generated: one partner per SuperNode
    assert supernodes_note(scenario="s.toml", partners=5, supernodes=5) is None
    assert supernodes_note(scenario="s.toml", partners=5, supernodes=2) == (
        "scenario s.toml has 5 partners, and 2 SuperNodes are connected: in a simulation only the first 2 take part "
        '(Flower simulates 2 unless told otherwise); run it with --federation-config "num-supernodes=5"'
    )
    assert "the 3 beyond them have no entry and fail every round" in str(supernodes_note(scenario="s.toml", partners=2, supernodes=5))


def test_a_scenario_file_names_every_problem_at_once(tmp_path: Path) -> None:
    (tmp_path / "shop").mkdir()
    path = tmp_path / "s.toml"
    path.write_text(
        '[[partner]]\ndata = "shop"\nname = "../elsewhere"\n\n'
        '[[partner]]\ndata = "missing"\n\n'
        "[[partner]]\ndata = 3\n\n"
        '[[partners]]\ndata = "shop"\n'  # a typo that would drop this partner without a word
    )
    with pytest.raises(ValueError) as info:
        load_scenario(path)
    assert str(info.value).splitlines() == [
        f"{path}:",
        "  unknown top-level key 'partners'; a scenario holds only [[partner]] tables",
        "  [[partner]] #1: name must be one folder name (it names the partner's folder partners/<name>), got '../elsewhere'",
        f"  [[partner]] #2: data folder {tmp_path / 'missing'} not found (a relative path is read from the scenario file's folder)",
        "  [[partner]] #3: data must be the domain's data folder, got 3",
    ]
    path.write_text('partner = ["shop"]\n')
    with pytest.raises(ValueError, match=r"\[\[partner\]\] #1: expected a table of settings, got 'shop'"):
        load_scenario(path)


def test_an_experiment_refuses_a_bad_cold_start_scenario_before_it_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from simulations import experiments

    (tmp_path / "shop").mkdir()
    (tmp_path / "s.toml").write_text('[[partner]]\ndata = "shop"\n')
    (tmp_path / "cold.toml").write_text('[[partner]]\ndata = "shop"\n')  # no partner with max-users: none is cold
    out = tmp_path / "out"
    argv = ["experiments", "--scenario", str(tmp_path / "s.toml"), "--coldstart-scenario", str(tmp_path / "cold.toml"), "--out", str(out)]
    monkeypatch.setattr("sys.argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        experiments.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"--coldstart-scenario: {tmp_path / 'cold.toml'}: a cold-start scenario's cold partner" in err
    assert "found 0 with max-users = None" in err
    assert not out.exists()  # nothing ran


def test_an_experiment_refuses_a_partner_that_withholds_its_scores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from simulations import experiments

    (tmp_path / "shop").mkdir()
    (tmp_path / "s.toml").write_text('[[partner]]\ndata = "shop"\nwithhold-metrics = true\n')
    assert load_scenario(tmp_path / "s.toml")[0].withhold_metrics  # a federation may have it
    monkeypatch.setattr("sys.argv", ["experiments", "--scenario", str(tmp_path / "s.toml"), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_info:
        experiments.main()
    assert exit_info.value.code == 2
    assert "partner(s) shop withhold their scores (withhold-metrics = true), which this script compares" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_generated_data_has_a_domain_for_every_simulated_partner(tmp_path: Path) -> None:
    specs = synthetic_scenario(tmp_path, partners=7)
    assert [s.name for s in specs] == sorted(["books", "games", "gear", "music-store", "kids", "books-2", "games-2"])
    assert all(s.data.is_dir() for s in specs)
    with pytest.raises(ValueError, match=r"needs at least 1 partner, and 0 were asked for"):
        synthetic_scenario(tmp_path / "none", partners=0)
    assert not (tmp_path / "none").exists()  # nothing generated
