"""One partner's recommender: shared adapter + private head (+ optional private residual, item ids).

Scores are cosine similarities divided by a temperature, between the head's
user state and the adapted item vectors, plus (optionally) a popularity prior:
a learned weight times ``log(1 + the item's count)``. Text alone barely predicts
popularity (a linear fit of log-counts on MiniLM vectors explains 12 % of their
variance on Scientific), and cosine scores cannot encode it, so without the
prior a text-only model ranks a best-seller no higher than a never-bought item
with similar text. New items count 0, so the model stays inductive. The counts
mix every user's data: without DP they are exact training counts; DP training
needs counts released with DP (:mod:`shared.privacy.item_counts`; see
:meth:`DomainModel.check_dp_safe`).

Under DP (Opacus), every trainable module must see inputs whose first dimension
is the batch, or its per-sample gradients are silently wrong. So the DP-safe
loss, :meth:`DomainModel.sampled_loss`, applies the adapter to candidates
gathered per user ([B, K, d_enc] and [B, L, d_enc]); :meth:`DomainModel.full_loss`
applies it to the whole catalogue (no batch dimension) and is for training
without DP only. The lora adapter runs each distinct item of a call through the
encoder once, for rows of many users, so it trains without DP only. Evaluation
ranks the full catalogue without gradients.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from shared.model.adapters import Adapter, LoraAdapter
from shared.model.head import HeadConfig, SequenceHead

LORA_CHUNK = 256  # items per encoder call of the lora adapter, sorted by length


class ItemFeatures(nn.Module):
    """A domain's frozen item inputs, row 0 = padding. Buffers are never sent or saved.

    ``vectors`` [N + 1, d_enc] for the moe adapter; ``input_ids`` and
    ``attention_mask`` [N + 1, T] for the lora adapter.
    """

    vectors: torch.Tensor | None
    input_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None

    def __init__(self, vectors: torch.Tensor | None = None, tokens: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.register_buffer("vectors", vectors, persistent=False)
        self.register_buffer("input_ids", tokens["input_ids"] if tokens else None, persistent=False)
        self.register_buffer("attention_mask", tokens["attention_mask"] if tokens else None, persistent=False)

    @property
    def n_items(self) -> int:
        source = self.vectors if self.vectors is not None else self.input_ids
        assert source is not None
        return int(source.shape[0]) - 1


class DomainModel(nn.Module):
    log_counts: torch.Tensor | None
    counts_noise: torch.Tensor | None

    def __init__(
        self,
        *,
        adapter: Adapter,
        features: ItemFeatures,
        head_config: HeadConfig,
        temperature: float = 0.07,
        item_ids: bool = False,
        item_counts: torch.Tensor | None = None,
        popularity_start: float = 0.0,
        counts_noise: float = 0.0,
        leave_one_out: bool = False,
        counts_window: int = 0,
        private_residual: bool = False,
    ) -> None:
        """``item_counts`` [N + 1] adds the popularity prior, its weight starting at
        ``popularity_start``; ``counts_noise``: the noise multiplier the counts were
        released with (0: exact counts, not for DP training). ``leave_one_out``: the
        counts are :func:`shared.privacy.item_counts.user_weighted_counts`, and the
        sampled loss takes each user's own share (``1 / sqrt(k)``) out of the counts
        of their items, as a test user's held-out item was never counted (else a
        training target's count always includes itself). ``private_residual``: add a
        linear map of the text vector, zero at the start, to the adapter's output; in a
        federation it stays with the partner (it is not the adapter), so the partner
        keeps what its own catalogue needs while the shared adapter is averaged."""
        super().__init__()
        self.adapter = adapter
        self.features = features
        self.dim = adapter.out_dim
        self.head = SequenceHead(self.dim, head_config)
        self.temperature = temperature
        self.max_len = head_config.max_len
        # A partner's own linear map of the text vector, added to the shared adapter's output.
        self.residual: nn.Linear | None = None
        if private_residual:
            if isinstance(adapter, LoraAdapter):
                raise ValueError("private_residual works on the text vectors of the moe adapter, not with lora")
            self.residual = nn.Linear(adapter.in_dim, self.dim, bias=False)
            nn.init.zeros_(self.residual.weight)  # the untrained model is the adapter's alone
        # Transductive option: a private per-item residual, zero at the start.
        self.item_ids: nn.Embedding | None = None
        if item_ids:
            self.item_ids = nn.Embedding(features.n_items + 1, self.dim, padding_idx=0)
            nn.init.zeros_(self.item_ids.weight)
        # Popularity prior: counts [N + 1] (row 0 = padding), saved with the private head.
        # Its weight is a Linear on the scalar log-count, a layer Opacus computes
        # per-user gradients for (it refuses trainable layers that hold buffers).
        self.popularity: nn.Linear | None = None
        if item_counts is not None and item_counts.shape != (features.n_items + 1,):
            raise ValueError(f"item_counts has shape {tuple(item_counts.shape)}, expected ({features.n_items + 1},)")
        self.register_buffer("log_counts", None if item_counts is None else torch.log1p(item_counts.float().clamp(min=0)))
        self.register_buffer("counts_noise", None if item_counts is None else torch.tensor(float(counts_noise)))
        self.leave_one_out = leave_one_out
        self.counts_window = counts_window
        if item_counts is not None:
            self.popularity = nn.Linear(1, 1, bias=False)
            nn.init.constant_(self.popularity.weight, popularity_start)
        self.register_load_state_dict_pre_hook(_rename_old_prior_keys)

    def private_state(self) -> dict[str, torch.Tensor]:
        """Everything but the shared adapter (head, residual, prior), as what is saved: detached contiguous copies on the CPU."""
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in self.state_dict().items() if not k.startswith("adapter.")}

    def check_dp_safe(self) -> None:
        """Raises if training this model under DP-SGD would void the guarantee."""
        if isinstance(self.adapter, LoraAdapter):
            raise ValueError(
                "the lora adapter cannot train under DP: it encodes each distinct item of a batch once, so one "
                "encoder row serves many users and Opacus' per-sample gradients would not be per user; "
                "use the moe adapter (adapter = 'moe'), whose rows are each one user's"
            )
        if self.popularity is not None and not (self.counts_noise is not None and float(self.counts_noise) > 0):
            raise ValueError(
                "the popularity prior's exact item counts cannot be used under DP: they mix every user's data, so "
                "one user's gradient would depend on the others' and the per-user clipping would not bound a "
                "user's influence; release the counts with shared.privacy.item_counts.release_item_counts "
                "(and account for them), or build the model without item_counts"
            )

    # ------------------------------------------------------------------ items
    def item_vectors(self, index: torch.Tensor) -> torch.Tensor:
        """Adapted item vectors for item indices [...] -> [..., d]."""
        if isinstance(self.adapter, LoraAdapter):
            out = self._encoded_items(self.adapter, index)
        else:
            assert self.features.vectors is not None
            text = self.features.vectors[index]  # [..., d_enc]
            out = self.adapter(text)
            if self.residual is not None:
                out = out + self.residual(text)
        if self.item_ids is not None:
            out = out + self.item_ids(index)
        return out

    def _encoded_items(self, adapter: LoraAdapter, index: torch.Tensor) -> torch.Tensor:
        """The lora adapter's vectors of item indices [...] -> [..., hidden].

        Each distinct item runs through the encoder once: a batch's rows repeat items 8-16x
        (padding, popular items, K negatives per user), and the encoder is the whole cost; the
        gather routes each row's gradient back to its item. The items go in order of length,
        ``LORA_CHUNK`` at a time, each chunk padded only to its own longest text (catalogues'
        texts run from a few tokens to 256)."""
        features = self.features
        assert features.input_ids is not None and features.attention_mask is not None
        distinct, row_of = torch.unique(index.reshape(-1), return_inverse=True)
        lengths = features.attention_mask[distinct].sum(1)  # [distinct]
        order = torch.argsort(lengths)
        parts = []
        for positions in order.split(LORA_CHUNK):
            chunk, width = distinct[positions], max(int(lengths[positions[-1]]), 1)  # sorted: the last is the longest
            parts.append(adapter(features.input_ids[chunk, :width], features.attention_mask[chunk, :width]))  # [chunk, hidden]
        by_length = torch.cat(parts)  # [distinct, hidden], in ``order``
        return by_length[torch.argsort(order)][row_of].reshape(*index.shape, -1)

    def catalogue(self, *, chunk: int = 4096) -> torch.Tensor:
        """All items, normalised, [N, d] (index 1..N). No per-sample gradients: not for DP."""
        n = self.features.n_items
        device = next(self.parameters()).device
        index = torch.arange(1, n + 1, device=device)
        parts = [self.item_vectors(index[i : i + chunk]) for i in range(0, n, chunk)]
        return F.normalize(torch.cat(parts), dim=-1)

    def item_bias(self, index: torch.Tensor, *, own_share: torch.Tensor | None = None) -> torch.Tensor:
        """The popularity prior of item indices [...] -> [...] (a scalar 0 without the prior).

        ``own_share`` [...]: taken out of each count first (see ``leave_one_out``)."""
        if self.popularity is None or self.log_counts is None:
            return torch.zeros((), device=index.device)
        log_counts = self.log_counts[index]
        if own_share is not None:
            log_counts = torch.log1p((torch.expm1(log_counts) - own_share).clamp(min=0))
        return self.popularity(log_counts.unsqueeze(-1)).squeeze(-1)

    # ------------------------------------------------------------------ users
    def user_states(self, seqs: torch.Tensor, vectors: torch.Tensor | None = None) -> torch.Tensor:
        """Right-padded histories [B, L] -> normalised states at every position [B, L, d].

        ``vectors`` [B, L, d]: the adapted vectors of ``seqs``, when already computed."""
        positions = torch.arange(seqs.shape[1], device=seqs.device).expand_as(seqs)
        return F.normalize(self.head(self.item_vectors(seqs) if vectors is None else vectors, positions), dim=-1)

    def last_states(self, seqs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """States after each history's last item [B, d]."""
        states = self.user_states(seqs)
        return states[torch.arange(len(seqs), device=seqs.device), lengths - 1]

    # ------------------------------------------------------------------ losses
    def full_loss(self, seqs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over the whole catalogue at every real position. Not DP-safe."""
        mask = targets > 0  # [B, L]
        states = self.user_states(seqs)[mask]  # [P, d]
        logits = states @ self.catalogue().T / self.temperature + self._catalogue_bias(states.device)  # [P, N]
        return F.cross_entropy(logits, targets[mask] - 1)

    def sampled_loss(self, seqs: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over each position's target and K negatives gathered per user.

        seqs, targets [B, L]; negatives [B, K] item indices, drawn uniformly for each
        user and shared by that user's positions (a negative equal to a position's
        target is masked out there). The adapter thus runs on B x (L + 1 + K) rows, not
        B x L x K. Returns the mean over real positions of each user, then over
        users: one user is one example.
        """
        return self.per_user_loss(seqs, targets, negatives).mean()

    def per_user_loss(self, seqs: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        """[B] sampled-softmax loss of each user (see :meth:`sampled_loss`)."""
        mask = targets > 0  # [B, L]
        length = seqs.shape[1]
        # The targets are the history shifted by one, so each user's rows are its whole
        # sequence (L + 1 items) and its negatives, in one adapter call: under Opacus each
        # row costs per-sample-gradient work, and each call of a layer one more pass.
        sequence = torch.cat([seqs[:, :1], targets], dim=1)  # [B, L + 1], right-padded
        if not torch.equal(sequence[:, :length] * (seqs > 0), seqs):
            raise ValueError("targets must be the histories shifted by one item (next-item pairs, right-padded)")
        rows = torch.cat([sequence, negatives], dim=1)  # [B, L + 1 + K]
        vectors = self.item_vectors(rows)  # [B, L + 1 + K, d]
        # A history's padding slot may hold its last item here: the head is causal, and
        # no real position sees it.
        states = self.user_states(seqs, vectors[:, :length])  # [B, L, d]
        positives = F.normalize(vectors[:, 1 : length + 1], dim=-1)  # [B, L, d]
        negative_vectors = F.normalize(vectors[:, length + 1 :], dim=-1)  # [B, K, d]
        positive_logits = (states * positives).sum(-1, keepdim=True) / self.temperature  # [B, L, 1]
        negative_logits = torch.einsum("bld,bkd->blk", states, negative_vectors) / self.temperature  # [B, L, K]
        if self.popularity is not None:  # one call on the same rows, as for the adapter
            share = self._own_share(rows, self._counted(sequence)) if self.leave_one_out else None
            bias = self.item_bias(rows, own_share=share)  # [B, L + 1 + K]
            positive_logits = positive_logits + bias[:, 1 : length + 1].unsqueeze(-1)
            negative_logits = negative_logits + bias[:, length + 1 :].unsqueeze(1)
        clash = negatives.unsqueeze(1) == targets.unsqueeze(-1)  # [B, L, K]
        logits = torch.cat([positive_logits, negative_logits.masked_fill(clash, float("-inf"))], -1)
        per_position = -F.log_softmax(logits, dim=-1)[..., 0] * mask  # [B, L]
        return per_position.sum(1) / mask.sum(1).clamp(min=1)  # [B]

    def _counted(self, sequence: torch.Tensor) -> torch.Tensor:
        """[B, S] the items of right-padded sequences that the counts took (the last ``counts_window``), others 0."""
        if not self.counts_window:
            return sequence
        lengths = (sequence > 0).sum(1, keepdim=True)  # [B, 1]
        positions = torch.arange(sequence.shape[1], device=sequence.device)  # [S]
        return sequence * (positions >= lengths - self.counts_window)

    @staticmethod
    def _own_share(rows: torch.Tensor, sequence: torch.Tensor) -> torch.Tensor:
        """[B, R] each user's own share of the counts of ``rows``: 1 / sqrt(its distinct items) on its items, else 0."""
        ordered = sequence.sort(dim=1).values  # [B, L + 1]
        distinct = ((ordered[:, 1:] != ordered[:, :-1]) & (ordered[:, 1:] > 0)).sum(1) + (ordered[:, 0] > 0).long()  # [B]
        own = ((rows.unsqueeze(-1) == sequence.unsqueeze(1)) & (sequence.unsqueeze(1) > 0)).any(-1)  # [B, R]
        return own / distinct.clamp(min=1).unsqueeze(1).float().sqrt()

    def forward(self, seqs: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        """The DP-safe training loss, as ``forward`` so that Opacus' wrapper calls it."""
        return self.sampled_loss(seqs, targets, negatives)

    @torch.no_grad()
    def score_all(self, seqs: torch.Tensor, lengths: torch.Tensor, catalogue: torch.Tensor | None = None) -> torch.Tensor:
        """Scores of every catalogue item [B, N] for histories [B, L]."""
        cat = self.catalogue() if catalogue is None else catalogue
        return self.last_states(seqs, lengths) @ cat.T / self.temperature + self._catalogue_bias(seqs.device)

    def _catalogue_bias(self, device: torch.device) -> torch.Tensor:
        return self.item_bias(torch.arange(1, self.features.n_items + 1, device=device))


def _rename_old_prior_keys(_module: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str, *_: object) -> None:
    """Models saved before the prior's weight became a layer kept it as a scalar."""
    if prefix + "popularity_weight" in state_dict:
        state_dict[prefix + "popularity.weight"] = state_dict.pop(prefix + "popularity_weight").reshape(1, 1)
        state_dict.setdefault(prefix + "counts_noise", torch.tensor(0.0))
