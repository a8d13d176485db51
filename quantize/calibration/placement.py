"""Where quantizers go in LAVT, and the quantized layer modules that carry them.

As in PTQ4RIS: every Linear/Conv of Swin, PWAM, BERT and the decoder (weights and input activations), and both
attention matmuls (q @ kᵀ, probs @ v) of Swin, PWAM and BERT. LayerNorm, softmax, GELU, residual adds and the
embeddings stay float; so does the decoder's final 2-class conv. The decoder's BatchNorms are folded into their
convs first, as any deployment does, so the simulated weights are the deployed ones.

Quantized layers subclass the float ones and share their parameters, so state-dict names do not change: a quantized
model's state dict is the float weights plus the quantizers' buffers (the qparams).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..models.layers import MatMul
from ..models.roles import LAVT_ROLES, LayerRoles, layer_roles, match
from .quantizers import (
    DrqGeluQuantizer,
    DrqSoftmaxQuantizer,
    FakeQuantizer,
    GroupQuantizer,
    TierQuantizer,
    UniformQuantizer,
    quantizer_from_spec,
)
from .recipe import Recipe

__all__ = [
    "QuantConv1d",
    "QuantConv2d",
    "QuantLinear",
    "QuantMatMul",
    "SiteInfo",
    "classify_site",
    "float_sites",
    "fold_batch_norms",
    "place_quantizers",
    "quantized_sites",
    "rebuild_quantizers",
    "set_quantization",
    "set_submodule",
]


@dataclass(frozen=True)
class SiteInfo:
    """One quantized layer.

    ``role`` names what feeds its (first) input, which decides the activation quantizer: ``post_softmax``,
    ``post_gelu``, ``post_relu``, ``text`` (a text-encoder Linear input), ``text_features`` (BERT's output entering
    PWAM), ``pwam_product`` (PWAM's vis ⊙ lang), ``image`` or ``generic``.
    """

    name: str
    op: str  # linear | conv1d | conv2d | matmul
    modality: str  # text | vision | fusion | decoder
    block: str  # the refresh group (a Swin block, a BERT layer, a stage's fusion, the decoder)
    role: str
    weight_blocks: int = 1  # row blocks with a weight scale each under per-tensor weights (fused q/k/v: 3)


class _QuantizedLayer:
    """Mixin: ``input_quantizer`` / ``weight_quantizer`` submodules, and an optional ``capture`` callback that
    calibration sets to record inputs and output gradients."""

    info: SiteInfo
    capture = None

    @classmethod
    def from_float(cls, module: nn.Module, info: SiteInfo, input_quantizer, weight_quantizer):
        q = cls.__new__(cls)
        # Shallow copies of the module's dicts: the parameters are shared, the submodule registry is not.
        q.__dict__ = {k: dict(v) if isinstance(v, dict) else v for k, v in module.__dict__.items()}
        q.info = info
        q.input_quantizer = input_quantizer
        q.weight_quantizer = weight_quantizer
        return q

    def _run(self, x: torch.Tensor, fn) -> torch.Tensor:
        out = fn(self.input_quantizer(x), self.weight_quantizer(self.weight))
        if self.capture is not None:
            out = self.capture(self, x, out)
        return out


class QuantLinear(_QuantizedLayer, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, lambda xq, wq: F.linear(xq, wq, self.bias))


class QuantConv1d(_QuantizedLayer, nn.Conv1d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, lambda xq, wq: self._conv_forward(xq, wq, self.bias))


class QuantConv2d(_QuantizedLayer, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, lambda xq, wq: self._conv_forward(xq, wq, self.bias))


class QuantMatMul(MatMul):
    """``bmm(a, b)`` with both operands quantized (``a_quantizer``, ``b_quantizer``)."""

    capture = None

    def __init__(self, info: SiteInfo, a_quantizer: FakeQuantizer, b_quantizer: FakeQuantizer) -> None:
        super().__init__()
        self.info = info
        self.a_quantizer = a_quantizer
        self.b_quantizer = b_quantizer

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = torch.bmm(self.a_quantizer(a), self.b_quantizer(b))
        if self.capture is not None:
            out = self.capture(self, (a, b), out)
        return out


_QUANT_CLASS = {nn.Linear: QuantLinear, nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d}
# Data-flow position of each part: the text encoder feeds every fusion, the decoder comes last.
_FLOW_ORDER = {"text": 0, "vision": 1, "fusion": 1, "decoder": 2}
_OP = {nn.Linear: "linear", nn.Conv1d: "conv1d", nn.Conv2d: "conv2d", MatMul: "matmul"}


@torch.no_grad()
def fold_batch_norms(model: nn.Module) -> None:
    """Fold each BatchNorm the model's layer roles name into the conv before it (which gains a bias); the BN becomes
    Identity, so folding twice is a no-op."""
    for fold in layer_roles(model).norm_folds:
        for name in LayerRoles.find(model, fold.norm):
            bn = model.get_submodule(name)
            if not isinstance(bn, nn.BatchNorm2d):
                continue
            conv = model.get_submodule(fold.into.format(**match(fold.norm, name)))
            std = torch.sqrt(bn.running_var + bn.eps)
            factor = bn.weight / std
            conv.weight.mul_(factor.reshape(-1, 1, 1, 1))
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            conv.bias = nn.Parameter((bias - bn.running_mean) * factor + bn.bias)
            set_submodule(model, name, nn.Identity())


def classify_site(name: str, module: nn.Module, roles: LayerRoles = LAVT_ROLES) -> SiteInfo | None:
    """The site of a float module, or None when it stays float (its type is not quantized). Its modality, block and
    role come from ``roles`` (the model's ``layer_roles``); a quantizable module no rule covers raises
    :class:`~quantize.models.roles.UnknownLayerError`."""
    op = next((o for t, o in _OP.items() if type(module) is t), None)
    if op is None:
        return None
    r = roles.site(name)
    return SiteInfo(name, op, r.modality, r.block, r.role, r.weight_blocks)


def _activation_quantizer(info: SiteInfo, recipe: Recipe, channels: int) -> FakeQuantizer:
    bits = recipe.act_bits
    vision_like = info.modality in ("vision", "fusion")
    if info.role == "post_softmax" and vision_like and recipe.softmax_drq:
        return DrqSoftmaxQuantizer(bits)
    if info.role == "post_gelu" and recipe.gelu_drq:
        return DrqGeluQuantizer(bits)
    if info.role == "text" and recipe.text == "tiers":
        return TierQuantizer(bits)
    if info.role == "text" and recipe.text == "groups":
        return GroupQuantizer(bits, channels, recipe.text_group_count, axis=-1, max_tiers=recipe.text_tier_count)
    if info.role in ("text_features", "pwam_product") and recipe.pwam_grouped:
        return GroupQuantizer(bits, channels, recipe.pwam_group_count, axis=1)
    return UniformQuantizer(bits, recipe.act_symmetric)


def _weight_quantizer(weight: torch.Tensor, recipe: Recipe, name: str) -> UniformQuantizer:
    # Always one scale slot per output channel; per-tensor recipes fill the slots of a tensor (or block) equally.
    bits = recipe.weight_bits_of(name)
    return UniformQuantizer(bits, symmetric=True, shape=(weight.shape[0],) + (1,) * (weight.dim() - 1))


def float_sites(model: nn.Module, recipe: Recipe | None = None) -> list[tuple[str, nn.Module, SiteInfo]]:
    """The float modules to quantize, in forward (data-flow) order: text encoder, vision + fusion, decoder."""
    roles = layer_roles(model)
    found = []
    for name, module in model.named_modules():
        info = classify_site(name, module, roles)
        if info is None:
            continue
        if name == roles.output_head and (recipe is None or recipe.keep_final_conv_float):
            continue
        found.append((name, module, info))
    return sorted(found, key=lambda t: _FLOW_ORDER[t[2].modality])  # stable: module order within a part


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` of ``model`` by ``module``."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def place_quantizers(model: nn.Module, recipe: Recipe) -> list[nn.Module]:
    """Replace every site of ``model`` (in place; BatchNorms folded first) by its quantized module, with quantizers
    chosen by ``recipe`` and placeholder qparams. Returns the quantized modules in data-flow order."""
    fold_batch_norms(model)
    placed = []
    sites = float_sites(model, recipe)
    unknown = {name for name, _ in recipe.layer_weight_bits} - {n for n, m, _ in sites if hasattr(m, "weight")}
    if unknown:
        raise UserError(
            f"layer_weight_bits names layers this model has no quantized weights for: {sorted(unknown)[:5]}"
        )
    for name, module, info in sites:
        if info.op == "matmul":
            a_role = info.role
            a = (
                DrqSoftmaxQuantizer(recipe.act_bits)
                if a_role == "post_softmax" and info.modality != "text" and recipe.softmax_drq
                else UniformQuantizer(recipe.act_bits, recipe.act_symmetric)
            )
            q = QuantMatMul(info, a, UniformQuantizer(recipe.act_bits, recipe.act_symmetric))
        else:
            channels = module.weight.shape[1]
            q = _QUANT_CLASS[type(module)].from_float(
                module,
                info,
                _activation_quantizer(info, recipe, channels),
                _weight_quantizer(module.weight, recipe, name),
            )
        set_submodule(model, name, q)
        placed.append(q)
    return placed


def quantized_sites(model: nn.Module) -> list[nn.Module]:
    """The quantized modules of a model prepared by :func:`place_quantizers`, in data-flow order."""
    sites = [m for m in model.modules() if isinstance(m, (_QuantizedLayer, QuantMatMul))]
    return sorted(sites, key=lambda m: _FLOW_ORDER[m.info.modality])


def quantizers_of(site: nn.Module) -> dict[str, FakeQuantizer]:
    if isinstance(site, QuantMatMul):
        return {"a_quantizer": site.a_quantizer, "b_quantizer": site.b_quantizer}
    return {"input_quantizer": site.input_quantizer, "weight_quantizer": site.weight_quantizer}


def rebuild_quantizers(model: nn.Module, specs: dict[str, dict[str, dict]]) -> None:
    """Replace the quantizers of a placed model by ones rebuilt from ``specs`` (site → slot → spec), so that an
    artifact's state dict loads with matching buffer shapes."""
    sites = {m.info.name: m for m in quantized_sites(model)}
    missing = set(sites) - set(specs)
    extra = set(specs) - set(sites)
    if missing or extra:
        raise ValueError(f"qparams do not match the model: missing {sorted(missing)}, unexpected {sorted(extra)}")
    for name, slots in specs.items():
        for slot, spec in slots.items():
            setattr(sites[name], slot, quantizer_from_spec(spec))


def set_quantization(model: nn.Module, enabled: bool, modalities: tuple[str, ...] | None = None) -> None:
    """Switch the quantizers of ``model`` on or off (all, or only those of the given modalities)."""
    for site in quantized_sites(model):
        on = enabled and (modalities is None or site.info.modality in modalities)
        for q in quantizers_of(site).values():
            q.enabled = on
