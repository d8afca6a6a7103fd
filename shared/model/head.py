"""Private head: a SASRec-style causal transformer over adapted item vectors.

SASRec: Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018.
Pre-norm blocks; attention from ``nn.Linear`` and
``F.scaled_dot_product_attention(is_causal=True)`` (not ``nn.MultiheadAttention``,
which Opacus replaces with a module that gave wrong outputs with
``batch_first=True``). Sequences are right-padded: with a causal mask, a real
position never sees the padding after it, so no padding mask is needed.

Both residual branches end in a zero-initialised projection and the position
embedding starts at zero, so the untrained head outputs the last item's own
vector: the model starts at the "last item's text similarity" baseline, and
training (and DP noise) starts from there rather than from random.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from shared.checks import Problem, SelfChecking, expect


@dataclass
class HeadConfig(SelfChecking):
    n_layers: int = field(default=2, metadata={"help": "transformer blocks"})
    n_heads: int = field(default=2, metadata={"help": "attention heads (must divide the width)"})
    max_len: int = field(default=50, metadata={"help": "longest history the head reads (most recent items)"})
    dropout: float = field(default=0.2, metadata={"help": "dropout on item vectors, attention and feed-forward"})
    ffn_mult: int = field(default=2, metadata={"help": "feed-forward width as a multiple of the model width"})

    def problems(self) -> list[Problem]:
        return expect(
            self,
            ("n_layers", self.n_layers >= 0, "a whole number of at least 0"),
            ("n_heads", self.n_heads >= 1, "a whole number of at least 1"),
            ("max_len", self.max_len >= 1, "a whole number of at least 1"),
            ("dropout", 0 <= self.dropout < 1, "a probability in [0, 1)"),
            ("ffn_mult", self.ffn_mult >= 1, "a whole number of at least 1"),
        )


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"n_heads={n_heads} must divide the width {dim}")
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, d = x.shape  # [B, L, d]
        q, k, v = self.qkv(x).view(b, length, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)  # 3 x [B, H, L, d/H]
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, length, d))  # [B, L, d]


class Block(nn.Module):
    def __init__(self, dim: int, config: HeadConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, config.n_heads, config.dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn_in = nn.Linear(dim, config.ffn_mult * dim)
        self.ffn_out = nn.Linear(config.ffn_mult * dim, dim)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.ffn_out(self.drop(F.gelu(self.ffn_in(self.norm2(x))))))


class SequenceHead(nn.Module):
    """Item vectors [B, L, d] (right-padded) -> user states [B, L, d]."""

    def __init__(self, dim: int, config: HeadConfig) -> None:
        super().__init__()
        self.config = config
        self.positions = nn.Embedding(config.max_len, dim)
        self.blocks = nn.ModuleList(Block(dim, config) for _ in range(config.n_layers))
        self.drop = nn.Dropout(config.dropout)
        with torch.no_grad():
            self.positions.weight.zero_()
            for block in self.blocks:
                assert isinstance(block, Block)
                for proj in (block.attn.out, block.ffn_out):
                    proj.weight.zero_()
                    proj.bias.zero_()

    def forward(self, items: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.drop(items + self.positions(positions))  # [B, L, d]
        for block in self.blocks:
            x = block(x)
        return x
