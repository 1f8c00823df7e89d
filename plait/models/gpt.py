"""A small GPT: token and position embeddings, pre-norm blocks of causal self-attention and MLP,
a final norm and an output head (tied to the token embedding or not).

Free of parallelism; ``tp_plan()`` says how tensor parallelism splits it (Megatron's layout:
the fused q/k/v projection split by heads and the MLP's up-projection colwise, the attention's
and MLP's output projections rowwise: each block all-reduces twice forward and twice backward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)  # q, k and v, one after the other
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (y.view(b, t, -1, self.head_dim).transpose(1, 2)  # [B, h, T, hd]: h = heads held here
                   for y in self.qkv(x).chunk(3, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, -1))  # [B, T, dim]


class MLP(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(dim), CausalSelfAttention(dim, heads)
        self.ln2, self.mlp = nn.LayerNorm(dim), MLP(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Embed(nn.Module):
    """Token plus position embeddings: the GPT's first pipeline block."""

    def __init__(self, tok_emb: nn.Module, pos_emb: nn.Module):
        super().__init__()
        self.tok_emb, self.pos_emb = tok_emb, pos_emb

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tok_emb(ids) + self.pos_emb(torch.arange(ids.shape[1], device=ids.device))  # [B, T, dim]


class Head(nn.Module):
    """The final norm and the output head: the GPT's last pipeline block."""

    def __init__(self, ln_f: nn.Module, head: nn.Module):
        super().__init__()
        self.ln_f, self.head = ln_f, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln_f(x))  # [B, T, vocab] (a vocabulary slice under tensor parallelism)


class GPT(nn.Module):
    def __init__(self, vocab_size: int, block_size: int, layers: int = 2, heads: int = 4, dim: int = 64,
                 tied: bool = False):
        super().__init__()
        self.tok_emb, self.pos_emb = nn.Embedding(vocab_size, dim), nn.Embedding(block_size, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        if tied:
            self.head.weight = self.tok_emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(ids) + self.pos_emb(torch.arange(ids.shape[1], device=ids.device))  # [B, T, dim]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))  # [B, T, vocab] (a vocabulary slice under tensor parallelism)

    def pipeline_blocks(self) -> list[tuple[str, nn.Module]]:
        """The same computation as consecutive blocks: the pipeline's cut points and ZeRO-3's
        units. Read at call time, so that it sees the layers tensor parallelism put in."""
        return [("embed", Embed(self.tok_emb, self.pos_emb)), *((f"blocks.{i}", b) for i, b in enumerate(self.blocks)),
                ("head", Head(self.ln_f, self.head))]

    @staticmethod
    def tp_plan() -> dict[str, str]:
        return {"tok_emb": "vocab", "blocks.*.attn.qkv": "qkv", "blocks.*.attn.proj": "rowwise",
                "blocks.*.mlp.up": "colwise", "blocks.*.mlp.down": "rowwise", "head": "colwise"}
