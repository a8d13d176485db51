"""Exact channel-permutation folding for the deployable form of RORQ.

Deployable RORQ quantizes an activation by contiguous channel groups, one int8 grid per group: BERT-family outlier
channels sit in a few fixed positions, so sorting channels by calibrated range puts them into their own group(s) and
every group becomes an ordinary int8 stream. A runtime gather would cost a copy on every inference; instead the
permutation is folded into the weights that produce the activation (output rows and biases) and the weights that
consume it (input columns), plus anything in between that is per channel or permutation-equivariant (LayerNorm,
InstanceNorm, GELU, products). The float function of the whole model is unchanged, up to the order of floating point
sums. Which modules write and read each permuted activation is declared once, in the model's layer roles
(:class:`~quantize.models.roles.FoldGroup`); this module only moves rows and columns.

Convention everywhere: ``perm[new_position] = old_channel``, i.e. after folding, channel ``j`` carries what channel
``perm[j]`` carried before. Every function validates ``perm`` before touching any weight, so a ValueError leaves the
model as it was, and keeps every Parameter the same object (optimisers, hooks and quantizer wrappers that hold
references stay valid).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..models.roles import FoldGroup, LayerRoles, layer_roles

__all__ = [
    "head_preserving_order",
    "permute_bert_context",
    "permute_bert_intermediate",
    "permute_group",
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


def _modules(model: nn.Module, patterns: tuple[str, ...], fields: dict[str, int]) -> list[nn.Module]:
    return [model.get_submodule(n) for p in patterns for n in LayerRoles.find(model, p, **fields)]


@torch.no_grad()
def permute_group(model: nn.Module, group: str | FoldGroup, perm: PermLike, index: int | None = None) -> None:
    """Fold ``perm`` into the modules of one fold group of the model's layer roles
    (:class:`~quantize.models.roles.FoldGroup`): the writers' output rows and biases, the readers' input columns.

    Args:
        group: the group or its name (``text_hidden``, ``text_intermediate``, ``text_context``, ``pwam_product``).
        perm: (C,) new position → old channel.
        index: for a group folded per layer or stage, which one.
    """
    roles = layer_roles(model)
    g = roles.fold_group(group) if isinstance(group, str) else group
    fields: dict[str, int] = {}
    what = g.name
    if g.per is None:
        if index is not None:
            raise ValueError(f"{g.name} is one permutation for the whole model: got index {index}")
    else:
        available = LayerRoles.indices(model, g.patterns[0], g.per)
        if index is None or index not in available:
            raise ValueError(
                f"{g.per}_index {index} out of range: {g.name} is folded per {g.per}, and the model has "
                f"{len(available)} of them"
            )
        fields = {g.per: index}
        what = f"{g.name}({g.per} {index})"
    rows, head_rows = _modules(model, g.rows, fields), _modules(model, g.head_rows, fields)
    columns = _modules(model, g.columns, fields)
    # Every writer and reader must carry the same channels, or the table does not describe this model.
    if not (rows or head_rows) or not columns:
        raise ValueError(f"{what}: no module of {type(model).__name__} matches the group's writers or readers")
    widths = {m.weight.shape[0] for m in rows + head_rows} | {m.weight.shape[1] for m in columns}
    if len(widths) != 1:
        raise ValueError(f"{what}: the group's modules disagree on the channel count ({sorted(widths)})")
    (size,) = widths
    p = _check_perm(perm, size, what)
    head_rows_index = None
    if g.heads is not None:
        (attention,) = _modules(model, (g.heads,), fields)
        if attention.num_heads * attention.head_dim != size:
            raise ValueError(f"{what}: {attention.num_heads} heads of {attention.head_dim} are not {size} channels")
        order = _head_order(p, attention.num_heads, attention.head_dim, what)
        head_rows_index = (order[:, None] * attention.head_dim + torch.arange(attention.head_dim)).flatten()
    for m in rows:
        _permute_outputs_(m, p)
    for m in head_rows:
        _permute_outputs_(m, head_rows_index)
    for m in columns:
        _take_(m.weight, 1, p)


def permute_text_hidden(model: nn.Module, perm: PermLike) -> None:
    """Permute BERT's hidden (residual-stream) channels throughout the text encoder and its PWAM consumers.

    Afterwards ``model.encode_text`` returns features whose channel j is the old channel ``perm[j]`` and
    ``model(image, ids, mask)`` is unchanged. LayerNorm statistics are sums over channels, hence
    permutation-invariant, and its affine part is per channel.
    """
    permute_group(model, "text_hidden", perm)


def permute_bert_intermediate(model: nn.Module, layer_index: int, perm: PermLike) -> None:
    """Permute the FFN hidden channels (GELU output, input of ``output.dense``) of one BERT layer."""
    permute_group(model, "text_intermediate", perm, layer_index)


def permute_bert_context(model: nn.Module, layer_index: int, perm: PermLike) -> None:
    """Permute the attention context of one BERT layer (input of ``attention.output.dense``, head-major channels).

    ``perm`` must move whole heads (and may reorder channels within a head): attention mixes a head's channels
    through q·kᵀ, so a channel cannot leave its head. q and k follow the head order only (any within-head order
    shared by q and k gives the same scores; keeping theirs avoids touching more than needed); v's channels pass
    straight through the probabilities to the context, so v takes the full perm.
    """
    permute_group(model, "text_context", perm, layer_index)


def permute_pwam_product(model: nn.Module, stage: int, perm: PermLike) -> None:
    """Permute the channels of stage ``stage``'s PWAM product ``vis * lang`` (input of ``project_mm[0]``)."""
    permute_group(model, "pwam_product", perm, stage)


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
