"""From data folders to a trained, evaluated and saved model (``fedxrec train``).

Saved model layout (what ``fedxrec recommend`` loads)::

    OUT/metrics.json                 {domain: {"valid": {...}, "test": {...}}}
    OUT/report.json                  baselines, epoch-0 metrics, history, timing, sizes
    OUT/model/model.json             configs, mode, encoder fingerprint, domains
    OUT/model/<domain>/adapter.safetensors   the shared adapter (wire format)
    OUT/model/<domain>/head.safetensors      the private head (+ item-id residual)
    OUT/model/<domain>/items.tsv             the catalogue: index, item id, text

A seed ensemble (``fedxrec train --seeds N`` or ``fedxrec finetune --seeds N``;
model.json ``"members"``: N, or ``{domain: N}`` where domains kept different
numbers) keeps each member's two weight files in ``<domain>/member-<k>/``
(k = 0..N-1) beside the one ``items.tsv``; it recommends by the members'
averaged scores.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import resource
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from shared.checks import Problem, SelfChecking, expect
from shared.data.readers import read_domain
from shared.data.split import DomainSplit, split_domain
from shared.data.tables import DomainData
from shared.device import training_device
from shared.encoder import TextEncoder
from shared.evaluation import Scorer, baselines
from shared.json_files import read_json_object
from shared.model.adapters import (
    AdapterConfig,
    LoraAdapter,
    MoEAdapter,
    MoEAdapterConfig,
    adapter_config_from_dict,
    build_adapter,
    load_adapter,
    n_parameters,
    save_adapter,
)
from shared.model.head import HeadConfig
from shared.model.recommender import DomainModel, ItemFeatures
from shared.training import (
    DomainRun,
    Metrics,
    TrainConfig,
    averaged_scorer,
    evaluate_model,
    keep_ensemble_or_best,
    seed_everything,
    train,
)
from shared.vector_cache import CacheStats, VectorCache, encode_texts


@dataclass
class ModelConfig(SelfChecking):
    adapter: AdapterConfig = field(default_factory=MoEAdapterConfig, metadata={"help": "the shared adapter"})
    head: HeadConfig = field(default_factory=HeadConfig, metadata={"help": "the private head"})
    temperature: float = field(default=0.07, metadata={"help": "softmax temperature on cosine scores"})
    item_ids: bool = field(default=False, metadata={"help": "add a private item-id residual (transductive)"})
    private_residual: bool = field(
        default=False, metadata={"help": "add a linear map of the text vector to the adapter's output (a federated partner's own)"}
    )
    popularity_prior: bool = field(
        default=True,
        metadata={"help": "add a learned weight x log(1 + training count) to each item's score (no item ids; not under DP)"},
    )

    def problems(self) -> list[Problem]:
        problems = expect(self, ("temperature", self.temperature > 0, "above 0"))
        # the head attends over the adapter's output; a LoRA adapter's width is the encoder's, known once it loads
        width = getattr(self.adapter, "dim", None)
        if width is not None and width % self.head.n_heads:
            problems.append(("head.n_heads", f"must divide the adapter's width, {width}, got {self.head.n_heads}"))
        return problems

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        return cls(
            adapter=adapter_config_from_dict(d["adapter"]),
            head=HeadConfig(**d["head"]),
            temperature=float(d["temperature"]),
            item_ids=bool(d["item_ids"]),
            private_residual=bool(d.get("private_residual", False)),  # models saved before the option had none
            popularity_prior=bool(d.get("popularity_prior", False)),  # models saved before the option had none
        )


@dataclass
class PreparedDomain:
    data: DomainData
    split: DomainSplit
    vectors: np.ndarray  # [N + 1, d_enc], row 0 = padding
    cache: CacheStats


def prepare_domain(
    path: str | Path,
    *,
    encoder: TextEncoder,
    cache: VectorCache | None,
    progress: bool = True,
    name: str | None = None,
    format: str | None = None,
) -> PreparedDomain:
    data = read_domain(path, name=name, format=format)
    split = split_domain(data)
    vectors, stats = encode_texts(split.item_texts, encoder=encoder, cache=cache, progress=progress)
    padded = np.concatenate([np.zeros((1, vectors.shape[1]), np.float32), vectors])
    return PreparedDomain(data, split, padded, stats)


def build_model(domain: PreparedDomain, config: ModelConfig, *, adapter: torch.nn.Module, encoder: TextEncoder) -> DomainModel:
    if isinstance(config.adapter, MoEAdapterConfig):
        features = ItemFeatures(vectors=torch.as_tensor(domain.vectors))
    else:
        tokens = encoder.tokenize(["", *domain.split.item_texts])
        features = ItemFeatures(tokens=tokens)
    assert isinstance(adapter, MoEAdapter | LoraAdapter)
    counts = torch.as_tensor(domain.split.item_popularity()) if config.popularity_prior else None
    return DomainModel(
        adapter=adapter,
        features=features,
        head_config=config.head,
        temperature=config.temperature,
        item_ids=config.item_ids,
        item_counts=counts,
        private_residual=config.private_residual,
    )


def new_adapter(config: ModelConfig, encoder: TextEncoder) -> torch.nn.Module:
    if isinstance(config.adapter, MoEAdapterConfig):
        return build_adapter(config.adapter, in_dim=encoder.dim)
    import copy

    return build_adapter(config.adapter, in_dim=encoder.dim, encoder_model=copy.deepcopy(encoder.model))


def peak_memory_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_and_evaluate(
    data_paths: Sequence[str | Path],
    out: str | Path,
    *,
    mode: str = "local",
    model_config: ModelConfig | None = None,
    train_config: TrainConfig | None = None,
    encoder: TextEncoder | None = None,
    cache: VectorCache | None = None,
    seeds: int = 1,
    device: str = "auto",
    log: Any = print,
) -> dict[str, dict[str, dict[str, float]]]:
    """Trains (``local``: each domain alone; ``pooled``: one shared adapter), evaluates, saves;
    returns each domain's valid/test metrics.

    ``seeds`` > 1: a seed ensemble. The whole training is repeated with seeds
    ``train_config.seed`` .. ``+ seeds - 1`` (each repeat is exactly a one-seed run
    with that seed), and each domain keeps the average of its models' scores or its
    best model alone, whichever has the higher valid NDCG@10
    (:func:`shared.training.keep_ensemble_or_best`); ``report.json`` holds every
    seed's metrics under ``"seeds"``. The counterpart of ``fedxrec finetune
    --seeds``, so that training alone can be compared with the same averaging.

    ``device``: where the models train and score (:func:`shared.device.training_device`);
    they are built on the CPU first, so a seed gives the same start on any device."""
    if mode not in ("local", "pooled"):
        raise ValueError(f"--mode must be 'local' or 'pooled', got {mode!r}")
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    mcfg = model_config or ModelConfig()
    tcfg = train_config or TrainConfig()
    on = training_device(device)
    out = Path(out)
    (out / "model").mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    encoder = encoder or TextEncoder()
    encoder.use(on)  # texts the cache lacks are encoded where the model trains
    cache = cache if cache is not None else VectorCache()
    domains = [prepare_domain(p, encoder=encoder, cache=cache) for p in data_paths]
    names = [d.split.name for d in domains]
    if len(set(names)) != len(names):
        raise ValueError(f"two --data folders have the same name {names}; domains are named after their folder")
    prep_seconds = time.monotonic() - t0
    for d in domains:
        log(
            f"{d.split.name}: {len(d.split.users)} users, {d.split.n_items} items; encoder cache hit rate {d.cache.hit_rate:.0%} ({d.cache.encoded} texts encoded)"
        )

    base = {d.split.name: baselines(d.split, d.vectors, max_len=mcfg.head.max_len) for d in domains}
    seed_list = list(range(tcfg.seed, tcfg.seed + seeds))
    members: dict[str, list[tuple[int, DomainRun, Metrics]]] = {name: [] for name in names}
    epoch0: dict[str, dict[str, float]] = {}
    histories: list[list[dict[str, object]]] = []
    t1 = time.monotonic()
    for seed in seed_list:
        if seeds > 1:
            log(f"seed {seed} ({seed - tcfg.seed + 1} of {seeds}):")
        # each seed is the whole of a one-seed 'fedxrec train --seed S', so a member is reproducible alone
        seed_everything(seed)
        groups: list[list[PreparedDomain]] = [domains] if mode == "pooled" else [[d] for d in domains]
        runs_by_group = []
        for group in groups:
            adapter = new_adapter(mcfg, encoder)
            runs_by_group.append([DomainRun(d.split, build_model(d, mcfg, adapter=adapter, encoder=encoder).to(on)) for d in group])
        for runs in runs_by_group:
            if seed == tcfg.seed:
                for r in runs:
                    epoch0[r.split.name] = evaluate_model(r, "test")
            histories.append(train(runs, dataclasses.replace(tcfg, seed=seed), log=log))
            for r in runs:
                members[r.split.name].append((seed, r, {w: evaluate_model(r, w) for w in ("valid", "test")}))
    train_seconds = time.monotonic() - t1

    metrics: dict[str, dict[str, dict[str, float]]] = {}
    seed_report: dict[str, dict[str, Any]] = {}
    for d in domains:
        name = d.split.name
        kept, metrics[name], ensemble, label = keep_ensemble_or_best(members[name], d.split, log=log)
        save_domain_model(out / "model" / name, kept, mcfg)
        seed_report[name] = {
            "seeds": [{"seed": seed, **m} for seed, _, m in members[name]],
            "ensemble": ensemble,
            "kept": label,
            "members": len(kept),
        }
    _, first_run, _ = members[names[0]][0]
    adapter_params = n_parameters(first_run.model.adapter)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_model_index(
        out / "model",
        mode=mode,
        config=mcfg,
        encoder=encoder,
        domains=names,
        data=data_paths,
        members={name: e["members"] for name, e in seed_report.items()},
    )
    report = {
        "mode": mode,
        "model": mcfg.to_dict(),
        "train": asdict(tcfg),
        "adapter_parameters": adapter_params,
        "adapter_bytes": adapter_params * 4,
        "encoder_bytes": encoder.n_bytes,
        "adapter_share_of_encoder": adapter_params * 4 / encoder.n_bytes,
        "baselines": base,
        "epoch0_test": epoch0,
        "metrics": metrics,
        "seeds": seed_report if seeds > 1 else None,
        "history": histories,
        "seconds": {"prepare": round(prep_seconds, 1), "train": round(train_seconds, 1), "total": round(time.monotonic() - t0, 1)},
        "peak_memory_mb": round(peak_memory_mb(), 1),
        "cache": {d.split.name: asdict(d.cache) for d in domains},
        "encoder_fingerprint": encoder.fingerprint,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return metrics


def write_model_index(
    model_dir: Path,
    *,
    mode: str,
    config: ModelConfig,
    encoder: TextEncoder,
    domains: list[str],
    data: Sequence[str | Path],
    members: int | dict[str, int] = 1,
    **extra: Any,
) -> None:
    """``model.json``: what :func:`load_domain_model` needs to rebuild the saved domains' models
    (``members``: how many models each domain's folder holds, a seed ensemble's size; one number
    for every domain, or one per domain)."""
    if isinstance(members, dict) and len(set(members.values())) == 1:
        members = next(iter(members.values()))  # the same for every domain: one number
    index = {
        "mode": mode,
        "model": config.to_dict(),
        "encoder_fingerprint": encoder.fingerprint,
        "encoder_path": str(encoder.model_path),
        "domains": domains,
        "data": [str(Path(p).resolve()) for p in data],
        "members": members,
        **extra,
    }
    (model_dir / "model.json").write_text(json.dumps(index, indent=2))


def member_folder(folder: Path, k: int) -> Path:
    """Where member ``k`` of a seed ensemble keeps its weights inside a domain's folder."""
    return folder / f"member-{k}"


def save_domain_model(folder: Path, run: DomainRun | Sequence[DomainRun], config: ModelConfig) -> None:
    """One domain's model: ``adapter.safetensors``, ``head.safetensors`` (head and prior) and ``items.tsv``;
    for several runs of one domain (a seed ensemble), each run's two weight files in ``member-<k>/``."""
    runs = [run] if isinstance(run, DomainRun) else list(run)
    if not runs or len({r.split.name for r in runs}) != 1:
        raise ValueError(f"save_domain_model saves one domain's model(s); got domains {[r.split.name for r in runs]}")
    folder.mkdir(parents=True, exist_ok=True)
    # a model saved here before (one model, or another number of members) must not leave weights behind
    for stale in folder.glob("member-*"):
        shutil.rmtree(stale)
    for name in ("adapter.safetensors", "head.safetensors"):
        (folder / name).unlink(missing_ok=True)
    for k, r in enumerate(runs):
        weights = folder if len(runs) == 1 else member_folder(folder, k)
        weights.mkdir(exist_ok=True)
        save_adapter(r.model.adapter, weights / "adapter.safetensors", config=config.adapter)
        save_file(r.model.private_state(), str(weights / "head.safetensors"))
    split = runs[0].split
    with (folder / "items.tsv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, delimiter="\t")
        w.writerow(["index", "item_id", "text"])
        for i, (item, text) in enumerate(zip(split.item_ids, split.item_texts, strict=True), start=1):
            w.writerow([i, item, text])


@dataclass
class LoadedModel:
    members: list[DomainModel]  # one model, or a seed ensemble's members
    item_ids: list[str]
    item_texts: list[str]

    @property
    def max_len(self) -> int:
        return self.members[0].max_len

    @cached_property
    def scores(self) -> Scorer:
        """Every catalogue item's score [B, N] for histories [B, L]: the members' average
        (each member's catalogue vectors computed once, on first use)."""
        return averaged_scorer(self.members)


def load_domain_model(
    model_dir: str | Path, domain: str | None = None, *, encoder: TextEncoder | None = None, cache: VectorCache | None = None
) -> LoadedModel:
    """Loads one domain's model saved by :func:`train_and_evaluate`."""
    model_dir = Path(model_dir)
    meta_path = model_dir / "model.json"
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{meta_path} not found: --model must be the 'model' folder written by 'fedxrec train' or 'fedxrec finetune' (OUT/model)"
        )
    meta = read_json_object(meta_path, what="a model's index", required=("domains", "encoder_fingerprint", "model"))
    names = meta["domains"]
    if domain is None:
        if len(names) != 1:
            raise ValueError(f"the model has domains {names}; choose one with --domain")
        domain = names[0]
    if domain not in names:
        raise ValueError(f"--domain {domain!r} is not in this model; it has {names}")
    if encoder is None:
        saved = meta.get("encoder_path")
        encoder = TextEncoder(saved if saved and Path(saved).is_dir() else None)
    if encoder.fingerprint != meta["encoder_fingerprint"]:
        raise ValueError(
            f"the encoder's fingerprint {encoder.fingerprint[:12]} differs from the model's {meta['encoder_fingerprint'][:12]}: vectors would not match"
        )
    config = ModelConfig.from_dict(meta["model"])
    folder = model_dir / domain
    with (folder / "items.tsv").open(encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t"))[1:]
    item_ids, texts = [r[1] for r in rows], [r[2] for r in rows]
    vectors, _ = encode_texts(texts, encoder=encoder, cache=cache if cache is not None else VectorCache(), progress=True)
    split = DomainSplit(domain, item_ids, texts, [], [], np.zeros(0, np.int64), np.zeros(0, np.int64))
    prepared = PreparedDomain(None, split, np.concatenate([np.zeros((1, vectors.shape[1]), np.float32), vectors]), CacheStats())  # type: ignore[arg-type]
    members_by_domain = meta.get("members", 1)  # models saved before seed ensembles have none
    n_members = int(members_by_domain[domain] if isinstance(members_by_domain, dict) else members_by_domain)
    weights = [folder] if n_members == 1 else [member_folder(folder, k) for k in range(n_members)]
    members = []
    for w in weights:
        for name in ("adapter.safetensors", "head.safetensors"):
            if not (w / name).is_file():
                raise FileNotFoundError(f"{w / name} not found: {meta_path} names {n_members} member(s) of {domain!r}")
        model = build_model(prepared, config, adapter=new_adapter(config, encoder), encoder=encoder)
        load_adapter(model.adapter, w / "adapter.safetensors")
        head = load_file(str(w / "head.safetensors"))
        missing, unexpected = model.load_state_dict(head, strict=False)
        missing = [k for k in missing if not k.startswith("adapter.")]
        if missing or unexpected:
            raise ValueError(f"{w / 'head.safetensors'} does not fit the model config: missing {missing[:3]}, unexpected {unexpected[:3]}")
        model.eval()
        members.append(model)
    return LoadedModel(members, item_ids, texts)
