"""The federation's run settings: ``[tool.flwr.app.config]`` keys, validated once.

Keys are kebab-case in the run config (``local-epochs``) and snake_case here
(``local_epochs``). :func:`settings_from_run_config` collects every problem
(unknown key with a suggestion, wrong type, value out of range) into one error,
instead of failing on the first or silently using a default for a typo.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from shared.checks import is_finite_number, is_whole_number
from shared.device import DEVICES

OPTIMIZERS = ("adamw", "sgd")  # local optimizers (client.local_training.make_optimizer)
TRAINS = ("all", "adapter")  # what local training trains
PERSONAL_MIXES = ("off", "valid")  # how a partner mixes the global adapter with its own
AGGREGATIONS = ("fedavg", "median", "trimmed-mean")  # the server's average (server.strategy.make_strategy)
# Not a run setting: the attention heads of the private head every partner builds over the adapter's
# output (client.partner.HEAD); the adapter's width must split evenly between them.
PARTNER_HEAD_HEADS = 2


@dataclass
class FederationSettings:
    rounds: int = field(default=3, metadata={"help": "federated rounds"})
    local_epochs: int = field(default=1, metadata={"help": "passes over a partner's users per round"})
    fraction_train: float = field(default=1.0, metadata={"help": "fraction of partners sampled per round"})
    min_partners: int = field(
        default=2,
        metadata={
            "help": "fewest partners a round needs. Not part of a run's identity: a run stopped at partners-timeout "
            "because a partner is gone for good may resume with fewer"
        },
    )
    round_timeout: float = field(
        default=3600.0,
        metadata={
            "help": "seconds the server waits for the partners' replies, once for a round's training and once for its "
            "evaluation (Flower's default: 3600); a partner that has not replied by then is recorded as failed, "
            "saying so, and the round goes on with the others. Not part of a run's identity: a resumed run may change it"
        },
    )
    partners_timeout: float = field(
        default=3600.0,
        metadata={
            "help": "seconds the server waits, before a round's training and again before its evaluation, for "
            "min-partners SuperNodes to be connected (Flower's own sampling waits without a limit); then the run stops, "
            "saying how many were, and a later run with the same run-id resumes after its last finished round. Not part "
            "of a run's identity: a resumed run may change it"
        },
    )
    adapter: str = field(default="moe", metadata={"help": "shared adapter kind: 'moe'"})
    moe_n_experts: int = field(default=4, metadata={"help": "moe adapter: experts"})
    moe_dim: int = field(
        default=128,
        metadata={
            "help": f"moe adapter: output width, a multiple of {PARTNER_HEAD_HEADS} (each partner's head attends over it with {PARTNER_HEAD_HEADS} heads)"
        },
    )
    lr: float = field(default=1e-3, metadata={"help": "local learning rate"})
    optimizer: str = field(default="adamw", metadata={"help": "local optimizer: 'adamw', or 'sgd' (momentum 0.9)"})
    batch_size: int = field(default=64, metadata={"help": "expected users per step (Poisson sampling under DP)"})
    negatives: int = field(default=128, metadata={"help": "uniform negatives per position (sampled softmax)"})
    dp: bool = field(default=True, metadata={"help": "train under user-level DP-SGD (Opacus)"})
    target_epsilon: float = field(default=8.0, metadata={"help": "epsilon each partner may spend over the whole run"})
    delta: float = field(default=0.0, metadata={"help": "delta; 0 means 1 / (10 x a partner's users)"})
    trains: str = field(
        default="adapter",
        metadata={
            "help": "what a round trains, with or without DP: 'adapter' (the shared adapter, the private residual and the prior's weight; the "
            "private head stays at its identity start) or 'all' (the head too); a local fine-tune can train the head"
            " after the federation"
        },
    )
    private_residual: bool = field(
        default=True,
        metadata={
            "help": "each partner adds a private linear map of the text vector (zero at the start) to the shared "
            "adapter's output: it is trained in the rounds like the adapter (under the same DP optimizer) but never "
            "sent, so a partner keeps what its own catalogue needs while the adapter is averaged"
        },
    )
    personal_mix: str = field(
        default="off",
        metadata={
            "help": "'off': every partner starts each round from, and is scored with, the global adapter (FedAvg). "
            "'valid' (without DP only): each partner mixes the global adapter with the one it trained in its last "
            "round, own + w x (global - own), choosing w in 0, 0.25, 0.5, 0.75, 1 by its validation NDCG@10, and starts "
            "the next round from (and is scored with) that mix; w = 0 is training alone, so a partner whose catalogue "
            "gains nothing from the others loses little (adaptive local aggregation, as in FedALA and APFL)"
        },
    )
    calibrate_prior: bool = field(
        default=False,
        metadata={
            "help": "when a partner scores the global adapter, it scales its popularity prior's weight by the factor in "
            "shared.training.PRIOR_SCALES with the best validation NDCG@10 (1 on a tie), reports that model's NDCG and "
            "Recall, and keeps the factor with the kept adapter (compare_runs and cold start score, and fedxrec finetune "
            "starts from, that model; the fine-tune trains the weight as trained and judges each epoch with it calibrated again). "
            "The weight is fitted beside the partner's own adapter under a sampled softmax; beside the "
            "averaged adapter and in a full ranking it is often too large (beauty, 4,000 users: x0.5). Scoring only: "
            "no round trains with the factor and nothing more is sent, so under DP it spends nothing, but like the "
            "metrics it reads the partner's validation users outside the guarantee; on a few hundred of them the "
            "choice follows noise"
        },
    )
    proximal_mu: float = field(
        default=0.0,
        metadata={
            "help": "FedProx's mu: each partner's local training adds mu / 2 x ||adapter - global adapter||^2, which "
            "keeps the shared adapter near the average and leaves what a partner's own catalogue needs to its private "
            "residual; 0 is plain FedAvg. Under DP it is added to the privatised gradient (it reads no data)"
        },
    )
    aggregation: str = field(
        default="fedavg",
        metadata={
            "help": "how the server combines the partners' adapters: 'fedavg' (Flower's FedAvg, weighted by num-examples), "
            "'median' (Flower's FedMedian: coordinate-wise median) or 'trimmed-mean' (Flower's FedTrimmedAvg: "
            "coordinate-wise mean without the trim-fraction largest and smallest values); the last two are unweighted, "
            "so one partner cannot pull the adapter far with a harmful update or an overstated num-examples "
            "(Yin et al., ICML 2018), at some cost in quality where the catalogues differ"
        },
    )
    trim_fraction: float = field(
        default=0.2,
        metadata={
            "help": "trimmed-mean: the fraction cut from each end, in [0, 0.5); with n partners int(n x fraction) are cut "
            "at each end, so 0.2 cuts one of 5 and none of 4 or fewer"
        },
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "per-user gradient clipping norm"})
    popularity_prior: bool = field(
        default=True,
        metadata={
            "help": "add a learned weight x log(1 + item count) to scores; under DP the counts are released once with "
            "user-level DP (popularity-noise) and accounted in the partner's budget"
        },
    )
    popularity_noise: float = field(
        default=3.0,
        metadata={
            "help": "under DP: noise multiplier of the item-count release (Gaussian, sensitivity 1 per user); at 3 it "
            "raises training's noise by ~1 % at epsilon 8 and ~4 % at epsilon 3; a release that would take over half "
            "the budget (epsilon 1) is skipped and the partner trains without the prior"
        },
    )
    popularity_window: int = field(
        default=2,
        metadata={
            "help": "the prior counts each user's last this many training items (0: whole histories); test items are "
            "users' latest, and whole-history counts rank them worse on amazon2014-office"
        },
    )
    accountant: str = field(default="rdp", metadata={"help": "Opacus accountant: 'rdp' or 'prv'"})
    seed: int = field(
        default=0,
        metadata={
            "help": "seed for the initial adapter, negatives and (without DP) local sampling and dropout; under DP, "
            "Poisson sampling and noise come from each partner's OS entropy instead, as the coordinator knows the seed"
        },
    )
    device: str = field(
        default="auto",
        metadata={
            "help": "where each partner trains and scores: 'auto' (a CUDA GPU if the partner's process sees one, else the "
            "CPU; in a simulation a partner sees a GPU only with client-resources-num-gpus > 0, so that setting decides), "
            "'cpu', or 'cuda' (a partner that sees no GPU fails its round before it spends anything, saying why). "
            "Not part of a run's identity: a run may resume on other hardware"
        },
    )
    scenario: str = field(default="synthetic", metadata={"help": "'synthetic' (generated data) or a scenario TOML file"})
    run_id: str = field(
        default="", metadata={"help": "run folder name under runs-dir; empty: a new time-stamped one; an existing one resumes"}
    )
    runs_dir: str = field(default="runs", metadata={"help": "where run folders are written"})
    partners_file: str = field(
        default="",
        metadata={
            "help": 'the coordinator\'s list of partners, a TOML file on its machine ([partners] then name = "node id" '
            "as 'flwr supernode register' printed it): only listed SuperNodes are sampled, and each reply is recorded "
            "under its node's listed name (one that gives another name is left out); use with flower-superlink "
            "--enable-supernode-auth, which fixes each node id to the partner's key. Empty: partners name themselves"
        },
    )

    def validate(self) -> list[str]:
        problems = []
        positive = ["rounds", "local_epochs", "min_partners", "moe_n_experts", "moe_dim", "batch_size", "negatives"]
        problems += [f"{run_config_key(k)} must be >= 1, got {getattr(self, k)}" for k in positive if getattr(self, k) < 1]
        if self.moe_dim >= 1 and self.moe_dim % PARTNER_HEAD_HEADS:
            problems.append(
                f"moe-dim must be a multiple of {PARTNER_HEAD_HEADS} (each partner's head attends over the adapter's output "
                f"with {PARTNER_HEAD_HEADS} heads), got {self.moe_dim}"
            )
        if not 0 < self.fraction_train <= 1:
            problems.append(f"fraction-train must be in (0, 1], got {self.fraction_train}")
        if self.adapter != "moe":
            problems.append(
                f"adapter must be 'moe' in a federation, got {self.adapter!r} ('lora' trains the encoder inside the loop "
                "and is available to 'fedxrec train' only; its DP version is not built yet)"
            )
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be {_either(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.trains not in TRAINS:
            problems.append(f"trains must be {_either(TRAINS)}, got {self.trains!r}")
        if self.personal_mix not in PERSONAL_MIXES:
            problems.append(f"personal-mix must be {_either(PERSONAL_MIXES)}, got {self.personal_mix!r}")
        elif self.dp and self.personal_mix == "valid":
            problems.append(
                "personal-mix = 'valid' needs dp = false: choosing the mix reads the partner's validation users outside "
                "DP-SGD, and the next round's DP training would start from that choice, so its guarantee would not "
                "cover them; under DP use personal-mix = 'off' and a local fine-tune after the federation (fedxrec finetune)"
            )
        if self.device not in DEVICES:
            problems.append(f"device must be {_either(DEVICES)}, got {self.device!r}")
        if self.accountant not in ("rdp", "prv"):
            problems.append(f"accountant must be 'rdp' or 'prv', got {self.accountant!r}")
        if self.dp and self.target_epsilon <= 0:
            problems.append(f"target-epsilon must be > 0 with dp on, got {self.target_epsilon}")
        if not 0 <= self.delta < 1:
            problems.append(f"delta must be in [0, 1), got {self.delta}")
        if self.dp and self.popularity_prior and self.popularity_noise <= 0:
            problems.append(
                f"popularity-noise must be > 0 with dp and popularity-prior on, got {self.popularity_noise} "
                "(exact counts would void the guarantee; set popularity-prior = false instead)"
            )
        if self.popularity_window < 0:
            problems.append(f"popularity-window must be >= 0 (0: whole histories), got {self.popularity_window}")
        if self.run_id and not RUN_ID.fullmatch(self.run_id):
            # partners keep each run's state in <state-dir>/runs/<run-id>: a plain name only
            problems.append(f"run-id must be letters, digits, '.', '_' or '-' (not starting with '.'), at most 100, got {self.run_id!r}")
        if self.aggregation not in AGGREGATIONS:
            problems.append(f"aggregation must be {_either(AGGREGATIONS)}, got {self.aggregation!r}")
        if not 0 <= self.trim_fraction < 0.5:
            problems.append(f"trim-fraction must be in [0, 0.5) (the fraction cut from each end), got {self.trim_fraction}")
        if self.proximal_mu < 0:
            problems.append(f"proximal-mu must be >= 0 (0: plain FedAvg), got {self.proximal_mu}")
        positive_numbers = ("lr", "max_grad_norm", "round_timeout", "partners_timeout")
        problems += [f"{run_config_key(k)} must be > 0, got {getattr(self, k)}" for k in positive_numbers if getattr(self, k) <= 0]
        return problems

    def to_run_config(self) -> dict[str, Any]:
        return {run_config_key(k): v for k, v in asdict(self).items()}


class SettingsError(ValueError):
    pass


RUN_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")


def _either(choices: tuple[str, ...]) -> str:
    return " or ".join(repr(c) for c in choices)


def run_config_key(name: str) -> str:
    """A field's run-config key: ``local_epochs`` -> ``local-epochs``."""
    return name.replace("_", "-")


def settings_from_run_config(run_config: dict[str, Any], *, ignore: tuple[str, ...] = ()) -> FederationSettings:
    """Reads and checks the run config; raises SettingsError listing every problem."""
    known = {run_config_key(f.name): f for f in fields(FederationSettings)}
    problems: list[str] = []
    values: dict[str, Any] = {}
    for key, value in run_config.items():
        if key in ignore:
            continue
        f = known.get(key)
        if f is None:
            close = difflib.get_close_matches(key, list(known), n=1)
            problems.append(
                f"unknown run-config key {key!r}" + (f"; did you mean {close[0]!r}?" if close else f"; known keys: {sorted(known)}")
            )
            continue
        default = f.default
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, float):  # finite: TOML (and so --run-config) reads nan and inf
            ok = is_finite_number(value)
            value = float(value) if ok else value
        elif isinstance(default, int):
            ok = is_whole_number(value)
        else:
            ok = isinstance(value, str)
        if not ok:
            expected = "a finite number" if isinstance(default, float) else type(default).__name__
            problems.append(f"run-config key {key!r}: expected {expected}, got {value!r}")
            continue
        values[f.name] = value
    settings = FederationSettings(**values)
    problems += settings.validate()
    if problems:
        raise SettingsError("invalid run config:\n  " + "\n  ".join(problems))
    return settings
