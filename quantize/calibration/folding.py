"""Exact channel-permutation folding for the deployable form of RORQ.

Deployable RORQ quantizes an activation by contiguous channel groups, one int8 grid per group: BERT-family outlier
channels sit in a few fixed positions, so sorting channels by calibrated range puts them into their own group(s) and
every group becomes an ordinary int8 stream. A runtime gather would cost a copy on every inference; instead the
permutation is folded into the weights that produce the activation (output rows and biases) and the weights that
consume it (input columns), plus anything in between that is per channel or permutation-equivariant (LayerNorm,
InstanceNorm, GELU, products). The float function of the whole model is unchanged, up to the order of floating point
sums.

Convention everywhere: ``perm[new_position] = old_channel``, i.e. after folding, channel ``j`` carries what channel
``perm[j]`` carried before. Every function validates ``perm`` before touching any weight, so a ValueError leaves the
model as it was, and keeps every Parameter the same object (optimisers, hooks and quantizer wrappers that hold
references stay valid).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..models.bert import BertLayer, BertModel
from ..models.lavt import LAVT
from ..models.pwam import PWAM

__all__ = [
    "head_preserving_order",
    "permute_bert_context",
    "permute_bert_intermediate",
    "permute_pwam_product",
    "permute_text_hidden",
]

PermLike = torch.Tensor | Sequence[int]


def _check_perm(perm: PermLike, size: int, what: str) -> torch.Tensor:
    """``perm`` as a 1-D int64 CPU tensor, or ValueError saying why it is not a permutation of ``range(size)``."""
    t = torch.as_tensor(perm)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{what}: perm must hold integer channel indices, got dtype {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{what}: perm must be 1-D, got shape {tuple(t.shape)}")
    if t.numel() != size:
        raise ValueError(f"{what}: perm has {t.numel()} entries, expected {size} (one per channel)")
    t = t.detach().to("cpu", torch.long)
    if ((t < 0) | (t >= size)).any():
        raise ValueError(f"{what}: perm is not a permutation of range({size}): it has values outside [0, {size})")
    repeated = torch.nonzero(torch.bincount(t, minlength=size) > 1).flatten().tolist()
    if repeated:
        raise ValueError(f"{what}: perm is not a permutation of range({size}): channels {repeated[:8]} repeat")
    return t


def _take_(tensor: torch.Tensor | None, dim: int, index: torch.Tensor) -> None:
    """tensor ← tensor.index_select(dim, index), written into the same storage."""
    if tensor is None:
        return
    tensor.copy_(tensor.index_select(dim, index.to(tensor.device)))


def _permute_outputs_(module: nn.Module, index: torch.Tensor) -> None:
    """Rows (and bias) of a Linear / Conv1d / affine norm: its output channel j becomes the old channel index[j]."""
    _take_(module.weight, 0, index)
    _take_(module.bias, 0, index)


def _text_encoder(model: LAVT) -> BertModel:
    if not isinstance(getattr(model, "text_encoder", None), BertModel):
        raise TypeError(f"expected a LAVT model with a quantize BertModel text_encoder, got {type(model).__name__}")
    return model.text_encoder


def _bert_layer(model: LAVT, layer_index: int) -> BertLayer:
    layers = _text_encoder(model).encoder.layer
    if not 0 <= layer_index < len(layers):
        raise ValueError(f"layer_index {layer_index} out of range: the text encoder has {len(layers)} layers")
    return layers[layer_index]


def _fusions(model: LAVT) -> list[PWAM]:
    return [layer.fusion for layer in model.backbone.layers]


@torch.no_grad()
def permute_text_hidden(model: LAVT, perm: PermLike) -> None:
    """Permute BERT's hidden (residual-stream) channels throughout the text encoder and its PWAM consumers.

    Afterwards ``model.encode_text`` returns features whose channel j is the old channel ``perm[j]`` and
    ``model(image, ids, mask)`` is unchanged.
    """
    bert = _text_encoder(model)
    hidden = bert.config.hidden_size
    p = _check_perm(perm, hidden, "permute_text_hidden")

    # The residual stream is the sum of the three tables, so all three must move together; LayerNorm statistics are
    # sums over channels, hence permutation-invariant, and its affine part is per channel.
    emb = bert.embeddings
    for table in (emb.word_embeddings, emb.position_embeddings, emb.token_type_embeddings):
        _take_(table.weight, 1, p)
    _permute_outputs_(emb.LayerNorm, p)

    for layer in bert.encoder.layer:
        attn = layer.attention
        for proj in (attn.self.query, attn.self.key, attn.self.value):
            _take_(proj.weight, 1, p)
        # Each sub-block writes back into the residual stream: its output rows and the LayerNorm that follows.
        _permute_outputs_(attn.output.dense, p)
        _permute_outputs_(attn.output.LayerNorm, p)
        _take_(layer.intermediate.dense.weight, 1, p)
        _permute_outputs_(layer.output.dense, p)
        _permute_outputs_(layer.output.LayerNorm, p)

    # The PWAMs are the only readers of the word features outside BERT.
    for fusion in _fusions(model):
        _take_(fusion.image_lang_att.f_key[0].weight, 1, p)
        _take_(fusion.image_lang_att.f_value[0].weight, 1, p)


@torch.no_grad()
def permute_bert_intermediate(model: LAVT, layer_index: int, perm: PermLike) -> None:
    """Permute the FFN hidden channels (GELU output, input of ``output.dense``) of one BERT layer."""
    layer = _bert_layer(model, layer_index)
    p = _check_perm(perm, layer.intermediate.dense.out_features, f"permute_bert_intermediate(layer {layer_index})")
    # GELU is element-wise, so permuting its input rows permutes its output the same way.
    _permute_outputs_(layer.intermediate.dense, p)
    _take_(layer.output.dense.weight, 1, p)


def _head_order(perm: torch.Tensor, num_heads: int, head_dim: int, what: str) -> torch.Tensor:
    """The old head at each new head position, or ValueError if ``perm`` mixes channels of different heads."""
    heads = perm.reshape(num_heads, head_dim) // head_dim
    split = torch.nonzero((heads != heads[:, :1]).any(dim=1)).flatten().tolist()
    if split:
        raise ValueError(
            f"{what}: perm must keep each head's {head_dim} channels contiguous (heads may be reordered, and channels "
            f"within a head); new head positions {split[:8]} mix channels of different heads"
        )
    return heads[:, 0]


@torch.no_grad()
def permute_bert_context(model: LAVT, layer_index: int, perm: PermLike) -> None:
    """Permute the attention context of one BERT layer (input of ``attention.output.dense``, head-major channels).

    ``perm`` must move whole heads (and may reorder channels within a head): attention mixes a head's channels
    through q·kᵀ, so a channel cannot leave its head.
    """
    layer = _bert_layer(model, layer_index)
    sa = layer.attention.self
    what = f"permute_bert_context(layer {layer_index})"
    p = _check_perm(perm, sa.num_heads * sa.head_dim, what)
    order = _head_order(p, sa.num_heads, sa.head_dim, what)

    # q·kᵀ is a sum over a head's channels, so q and k only need to follow the head order (any within-head order
    # shared by q and k gives the same scores; keeping theirs avoids touching more than needed). v's channels pass
    # straight through the probabilities to the context, so v takes the full perm.
    qk_rows = (order[:, None] * sa.head_dim + torch.arange(sa.head_dim)).flatten()
    _permute_outputs_(sa.query, qk_rows)
    _permute_outputs_(sa.key, qk_rows)
    _permute_outputs_(sa.value, p)
    _take_(layer.attention.output.dense.weight, 1, p)


def head_preserving_order(channel_range: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The range-sorted order that :func:`permute_bert_context` accepts.

    Heads ascending by their largest channel range, channels inside each head ascending by range; both sorts are
    stable. Contiguous groups of this order then share a grid with channels of similar range as far as the head
    constraint allows: the outlier-carrying heads end up last.

    Args:
        channel_range: (C,) calibrated range per channel, head-major (channel = head * d + i).
        num_heads: heads; C must be a multiple of it.
    Returns:
        (C,) int64 ``perm`` (new position → old channel).
    """
    r = torch.as_tensor(channel_range)
    if r.dim() != 1:
        raise ValueError(f"channel_range must be 1-D, got shape {tuple(r.shape)}")
    if num_heads <= 0 or r.numel() % num_heads:
        raise ValueError(f"{r.numel()} channels cannot be split into {num_heads} heads")
    if r.is_floating_point() and not torch.isfinite(r).all():
        raise ValueError("channel_range has NaN or infinite entries: calibration produced no usable range")
    d = r.numel() // num_heads
    per_head = r.reshape(num_heads, d)
    within = torch.argsort(per_head, dim=1, stable=True)
    order = torch.argsort(per_head.amax(dim=1), stable=True)
    return (order[:, None] * d + within[order]).flatten().long()


@torch.no_grad()
def permute_pwam_product(model: LAVT, stage: int, perm: PermLike) -> None:
    """Permute the channels of stage ``stage``'s PWAM product ``vis * lang`` (input of ``project_mm[0]``)."""
    fusions = _fusions(model)
    if not 0 <= stage < len(fusions):
        raise ValueError(f"stage {stage} out of range: the backbone has {len(fusions)} stages")
    fusion = fusions[stage]
    p = _check_perm(perm, fusion.project_mm[0].in_channels, f"permute_pwam_product(stage {stage})")
    # Both factors must move together for the product to be permuted. vis passes a GELU (element-wise); lang passes
    # an affine-free InstanceNorm, which normalises each channel on its own, so both commute with the permutation.
    _permute_outputs_(fusion.vis_project[0], p)
    _permute_outputs_(fusion.image_lang_att.W[0], p)
    _take_(fusion.project_mm[0].weight, 1, p)
