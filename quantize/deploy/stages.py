"""The programs a LAVT model is cut into for deployment, and what each one takes as input.

``full`` is image + ids → mask logits; the Android app loads ``text`` (ids → word features) and ``visual`` (image +
word features → mask logits: Swin, PWAM fusion and the decoder), so that one sentence's features serve many frames.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from quantize.calibration.placement import set_quantization
from quantize.errors import UserError
from quantize.models.roles import LAVT_ROLES, LayerRoles

__all__ = ["STAGES", "Stage", "float_stage", "in_stage", "stage_inputs"]

# Program inputs, in order: what a runtime must feed each stage.
STAGES: dict[str, tuple[str, ...]] = {
    "full": ("image", "input_ids", "attention_mask"),
    "text": ("input_ids", "attention_mask"),
    "visual": ("image", "text_features", "attention_mask"),
}


class Stage(nn.Module):
    """One program's worth of LAVT: ``full`` (image + ids → mask logits), ``text`` (ids → word features) or
    ``visual`` (image + word features → mask logits: Swin, PWAM fusion and the decoder)."""

    def __init__(self, model: nn.Module, stage: str) -> None:
        super().__init__()
        if stage not in STAGES:
            raise UserError(f"unknown stage {stage!r}: choose one of {', '.join(STAGES)}")
        self.model, self.stage = model, stage

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.stage == "full":
            return self.model(*inputs)
        if self.stage == "text":
            return self.model.encode_text(*inputs)
        return self.model.forward_with_text_features(*inputs)


def in_stage(name: str, stage: str, roles: LayerRoles = LAVT_ROLES) -> bool:
    """Whether the module ``name`` of a :class:`Stage` (``model.…``) runs in ``stage``: every module runs in
    ``full``; otherwise the model's layer roles (``roles``, its ``layer_roles``) say which program holds it."""
    if stage not in STAGES:
        raise UserError(f"unknown stage {stage!r}: choose one of {', '.join(STAGES)}")
    return stage == "full" or roles.program_of(name.removeprefix("model.")) == stage


def stage_inputs(model: nn.Module, stage: str, images, input_ids, attention_mask) -> tuple[torch.Tensor, ...]:
    """The inputs of ``stage`` for a batch of pairs (word features come from ``model``'s own text encoder)."""
    if stage == "full":
        return images, input_ids, attention_mask
    if stage == "text":
        return input_ids, attention_mask
    with torch.no_grad():
        return images, model.encode_text(input_ids, attention_mask).contiguous(), attention_mask


def float_stage(calibrated: nn.Module, stage: str) -> Stage:
    """``stage`` of a calibrated model with quantization off, on a copy (``calibrated`` keeps its quantizers): the
    float program both backends export beside the quantized one, so that the two differ only in quantization."""
    model = copy.deepcopy(calibrated).eval()
    set_quantization(model, False)
    return Stage(model, stage).eval()
