"""GPT-style language models as a chain of blocks.

Block 0 embeds tokens and positions, blocks 1..L are pre-LayerNorm transformer
blocks, and the last block is the final LayerNorm plus the language-model head.
The head is not tied to the token embedding: each block's weights stream from
the parameter server on their own, so no parameter may live in two blocks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.zoo import GPTShape


class Embedding(nn.Module):
    """Token plus learned position embedding: int64 ``[B, T]`` -> ``[B, T, d_model]``."""

    def __init__(self, shape: GPTShape):
        super().__init__()
        self.token_embedding = nn.Embedding(shape.vocab_size, shape.d_model)
        self.position_embedding = nn.Embedding(shape.seq_len, shape.d_model)
        self.dropout = nn.Dropout(shape.dropout)

    def forward(self, tokens_BT: Tensor) -> Tensor:
        positions_T = torch.arange(tokens_BT.shape[1], device=tokens_BT.device)
        return self.dropout(self.token_embedding(tokens_BT) + self.position_embedding(positions_T))


class CausalSelfAttention(nn.Module):
    def __init__(self, shape: GPTShape):
        super().__init__()
        self.num_heads = shape.num_heads
        self.dropout = shape.dropout
        self.qkv = nn.Linear(shape.d_model, 3 * shape.d_model)
        self.out = nn.Linear(shape.d_model, shape.d_model)

    def forward(self, x_BTD: Tensor) -> Tensor:
        batch, time, width = x_BTD.shape
        qkv = self.qkv(x_BTD).view(batch, time, 3, self.num_heads, width // self.num_heads)
        q_BHTd, k_BHTd, v_BHTd = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        y_BHTd = F.scaled_dot_product_attention(
            q_BHTd, k_BHTd, v_BHTd, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out(y_BHTd.transpose(1, 2).reshape(batch, time, width))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``."""

    def __init__(self, shape: GPTShape):
        super().__init__()
        self.ln_attn = nn.LayerNorm(shape.d_model)
        self.attn = CausalSelfAttention(shape)
        self.ln_mlp = nn.LayerNorm(shape.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(shape.d_model, shape.d_ff),
            nn.GELU(),
            nn.Linear(shape.d_ff, shape.d_model),
        )
        self.dropout = nn.Dropout(shape.dropout)

    def forward(self, x_BTD: Tensor) -> Tensor:
        x_BTD = x_BTD + self.dropout(self.attn(self.ln_attn(x_BTD)))
        return x_BTD + self.dropout(self.mlp(self.ln_mlp(x_BTD)))


class LMHead(nn.Module):
    """Final LayerNorm and the (untied) projection to vocabulary logits."""

    def __init__(self, shape: GPTShape):
        super().__init__()
        self.ln = nn.LayerNorm(shape.d_model)
        self.lm_head = nn.Linear(shape.d_model, shape.vocab_size, bias=False)

    def forward(self, x_BTD: Tensor) -> Tensor:
        return self.lm_head(self.ln(x_BTD))


def _init_gpt(model: nn.Sequential, shape: GPTShape) -> None:
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=shape.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    # GPT-2 scales the projections that write into the residual stream by
    # 1/sqrt(number of residual additions) so the stream's variance does not
    # grow with depth.
    residual_std = shape.init_std / math.sqrt(2 * shape.num_layers)
    for block in model:
        if isinstance(block, TransformerBlock):
            nn.init.normal_(block.attn.out.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp[-1].weight, mean=0.0, std=residual_std)


def build_gpt(shape: GPTShape) -> nn.Sequential:
    """Embedding, ``num_layers`` transformer blocks, head: ``num_layers + 2`` blocks."""
    model = nn.Sequential(
        Embedding(shape),
        *(TransformerBlock(shape) for _ in range(shape.num_layers)),
        LMHead(shape),
    )
    _init_gpt(model, shape)
    return model
