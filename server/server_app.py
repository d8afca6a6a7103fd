"""fedxrec ServerApp: read the run config, build Flower's FedAvg, start, save.

Only adapter weights travel; the average is Flower's FedAvg weighted by the
number of users each partner trained on (or, with ``aggregation``, Flower's
coordinate-wise median or trimmed mean). Everything the run leaves is in the run
folder (see :mod:`server.run_folder`).
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from server.partner_list import load_partner_list
from server.round_wait import RoundWaitGrid
from server.rounds import end_round
from server.run_folder import RunFolder, new_run_id
from server.strategy import TooFewPartners, make_strategy
from shared.encoder import TextEncoder
from shared.federation.adapter import initial_adapter
from shared.federation.scenario import load_scenario, supernodes_note
from shared.federation.settings import settings_from_run_config

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = settings_from_run_config(dict(context.run_config))
    settings.run_id = settings.run_id or new_run_id()
    partner_list = load_partner_list(settings.partners_file) if settings.partners_file else None  # before anything is written
    run = RunFolder.open(settings)
    run.write_config(settings)
    encoder = TextEncoder()  # for its fingerprint, width and size; it never leaves anyone
    data = {} if settings.scenario == "synthetic" else {p.name: p.data for p in load_scenario(settings.scenario)}
    names = partner_list.record() if partner_list else None
    run.write_manifest(settings=settings, encoder_fingerprint=encoder.fingerprint, data=data, names=names)

    done = run.last_round()
    arrays = run.adapter(done) if done else initial_adapter(settings, in_dim=encoder.dim)
    print(f"run folder {run.root}" + (f"; resuming after round {done}" if done else ""))
    if data and (note := supernodes_note(scenario=settings.scenario, partners=len(data), supernodes=len(list(grid.get_node_ids())))):
        print(f"warning: {note}")
    strategy = make_strategy(settings, first_round=done + 1, holders=run.name_holders(), partner_list=partner_list)
    config = ConfigRecord(settings.to_run_config())

    def after_round(server_round: int, record: ArrayRecord) -> None:
        r = server_round + done
        end_round(run, r, record.to_torch_state_dict(), strategy.finish_round(server_round), encoder_bytes=encoder.n_bytes)

    adapter_bytes = sum(v.numel() * v.element_size() for v in arrays.values())

    def summarise() -> None:
        run.write_summary(settings=settings, adapter_bytes=adapter_bytes, encoder_bytes=encoder.n_bytes, names=names)

    if settings.rounds > done:
        try:
            strategy.start(
                grid=RoundWaitGrid(grid),  # not waiting for a partner that restarted mid-round; the silent recorded at the timeout
                initial_arrays=ArrayRecord(arrays),
                num_rounds=settings.rounds - done,
                train_config=config,
                evaluate_config=config,
                evaluate_fn=lambda rnd, rec: after_round(rnd, rec) if rnd > 0 else None,
                timeout=settings.round_timeout,
            )
        except TooFewPartners:
            summarise()  # the rounds it finished, for whoever resumes the run
            raise
    summarise()
    print("\n" + (run.root / "summary.md").read_text())
