"""The scenario files shipped in simulations/scenarios/ load, and name data that exists."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.federation.scenario import PartnerSpec, load_scenario, supernodes_note
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
