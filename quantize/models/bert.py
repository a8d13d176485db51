"""BERT encoder (no pooler), parameter-compatible with transformers' ``BertModel``.

"BERT: Pre-training of Deep Bidirectional Transformers for Language Understanding" (Devlin et al., 2019); the
layout follows transformers' ``modeling_bert.py`` (Apache-2.0), whose config class and checkpoints we use as they
are. We own the module so that it exports: attention is 3-D ``bmm``, LayerNorm the delegable 4-D form, the padding
mask additive -1e4 (finite in fp16), no SDPA. ``LayerNorm`` keeps its CamelCase name because that is the name in
every BERT checkpoint.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import BertConfig

from .layers import BatchedAttention, LayerNorm

__all__ = ["BertModel"]

MASK_VALUE = 1e4


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        # Not persistent: LAVT checkpoints do not store it, newer transformers files sometimes do (dropped on load).
        self.register_buffer(
            "position_ids", torch.arange(config.max_position_embeddings).unsqueeze(0), persistent=False
        )

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        n = input_ids.shape[1]
        # token_type_ids are all 0 for single sentences, as in LAVT: add row 0 of the table.
        x = self.word_embeddings(input_ids) + self.position_embeddings(self.position_ids[:, :n])
        x = x + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(
                f"hidden_size {config.hidden_size} is not a multiple of num_attention_heads {config.num_attention_heads}"
            )
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.core = BatchedAttention()

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        return x.reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2).reshape(B * self.num_heads, N, -1)

    def forward(self, hidden: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        """hidden (B, N, C), mask_bias (B, 1, N) additive -> (B, N, C)."""
        B, N, C = hidden.shape
        # Scale folded into q: same function, and no scalar constant next to the quantized matmul.
        q = self._heads(self.query(hidden) * (1.0 / math.sqrt(self.head_dim)))
        k = self._heads(self.key(hidden))
        v = self._heads(self.value(hidden))
        out = self.core(q, k, v, mask_bias, batch=B)  # B*heads, N, d
        return out.reshape(B, self.num_heads, N, self.head_dim).transpose(1, 2).reshape(B, N, C)


class BertSelfOutput(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(hidden) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, hidden: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(hidden, mask_bias), hidden)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        if config.hidden_act != "gelu":
            raise ValueError(f"only hidden_act='gelu' (exact erf GELU) is supported, got {config.hidden_act!r}")
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = nn.GELU()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.intermediate_act_fn(self.dense(hidden))


class BertOutput(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(hidden) + residual)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, hidden: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        attn = self.attention(hidden, mask_bias)
        return self.output(self.intermediate(attn), attn)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(self, hidden: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            hidden = layer(hidden, mask_bias)
        return hidden


class BertModel(nn.Module):
    """BERT without pooler: ``(input_ids, attention_mask) -> last_hidden_state`` (B, N, hidden)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input_ids: (B, N) int64 or int32 token ids.
            attention_mask: (B, N), 1 on real tokens, 0 on padding (any numeric dtype).
        Returns:
            last_hidden_state (B, N, hidden).
        """
        B, N = input_ids.shape
        mask = attention_mask.to(torch.float32).reshape(B, 1, N)
        mask_bias = mask * MASK_VALUE - MASK_VALUE
        return self.encoder(self.embeddings(input_ids.long()), mask_bias)
