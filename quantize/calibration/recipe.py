"""Calibration recipes: what each method quantizes how, as one frozen, serialisable value.

A method name (``ptq4ris``, ``minmax``, …) is a preset :class:`Recipe`; a bit setting (``w8a8`` …) fills in the
bit widths. Every choice the results table compares is one field here, so ablations are presets, not code paths.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any
from ..errors import UserError

__all__ = ["BIT_SETTINGS", "METHODS", "METHOD_HELP", "Recipe", "make_recipe", "parse_bits"]

BIT_SETTINGS: dict[str, tuple[int, int]] = {"w8a8": (8, 8), "w6a6": (6, 6), "w4a8": (4, 8), "w4a4": (4, 4)}

_CHOICES = {
    "weight_granularity": ("per_tensor", "per_channel"),
    "act_init": ("minmax", "percentile"),
    "softmax": ("uniform", "drq"),
    "gelu": ("uniform", "drq"),
    "text": ("uniform", "tiers", "groups"),
    "pwam": ("plain", "groups"),
    "search": ("none", "hessian", "mse", "cosine"),
    "refresh": ("block", "layer"),
    "weights": ("nearest", "gptq", "auto"),
}


@dataclass(frozen=True)
class Recipe:
    """One calibration method at one bit setting.

    Args:
        method: preset name, recorded in artifacts and tables.
        weight_bits, act_bits: 2..8.
        weight_granularity: symmetric weights per tensor (a fused q/k/v Linear gets one scale per block) or per
            output channel.
        act_symmetric: activation grids symmetric (PTQ4ViT) or asymmetric (zero point free).
        act_init: first activation ranges by min-max or by a percentile of |x| (``percentile``).
        softmax: post-softmax inputs of the vision/fusion attention (probs @ v): uniform grid or DRQ.
        gelu: post-GELU inputs (Swin fc2, PWAM language gate): uniform grid or DRQ.
        text: inputs of the text encoder's Linears: uniform, element-wise RORQ tiers, or RORQ channel groups
            (permutation folded into the weights).
        text_groups: channel groups per text Linear input with ``text="groups"``; 0 picks by activation bits: 2
            at A8, 8 below. Each group is one int8 GEMM once deployed, and with MiniLM's 20 tokens the text encoder's
            time is per-op overhead more than arithmetic: on lavt-tiny W8A8 two groups score 97.04 mIoU against 97.08
            with eight (96.94 with one grid) and run the text program in about 0.6x the time of eight.
        text_tiers: with ``text="groups"``, at most this many magnitude tiers (the 3σ rule of element-wise RORQ):
            the groups quantize the input clamped to the first threshold and every further tier is a residual
            slice with its own grid, one more int8 stream (a GEMM over the channels that reach the slice). 0 picks
            by activation bits: 1 (groups only) at A8, 10 below, where groups alone collapse (lavt-tiny W4A4: 8
            groups 70.13, 96 groups 90.25, 8 groups with tier slices 92.21 mIoU, element-wise tiers 91.69).
        pwam: PWAM's element-wise product (input of ``project_mm``) and its text-feature inputs: one grid
            (``plain``) or range-ordered channel groups (``groups``, permutation folded).
        pwam_groups: channel groups with ``pwam="groups"``; 0 picks by bits: one grid (as ``plain``) at W8A8, 16
            otherwise. At W8A8 the groups gain nothing measurable (lavt-tiny: 97.08 vs 97.12 mIoU simulated, 96.86
            vs 96.88 deployed) but are 16 GEMMs per fusion input once deployed: the visual program has 1,730 nodes
            instead of 3,189, lowers in half the time and runs 0.50-0.54x instead of 0.57x the float program. With
            4-bit weights they pay even at A8 (W4A8: 96.65 vs 96.22).
        search: scale search objective: none (min-max), Hessian-guided (KL over the class axis, gradients through the
            partially quantized model), MSE or cosine of the layer output.
        candidates, alpha_min, alpha_max: the grid α·Δ0 searched.
        rounds: alternating weight/activation rounds per layer.
        refresh: recompute inputs and gradients before every block (default) or every layer.
        max_rows: rows (tokens/pixels) per layer kept for the search, sampled with ``seed``.
        screen_rows, refine: every candidate is scored on ``screen_rows`` of those rows, the ``refine`` best on all.
        gelu_pow2: DRQ post-GELU positive step restricted to 2^k times the negative step.
        drq_min_bits: DRQ is used only from this many activation bits on; below, softmax/GELU get the searched
            uniform grid. DRQ spends b−1 bits per region; whether three-bit regions pay at A4 depends on the rest
            of the recipe (lavt-tiny W4A4: −1.6 mIoU with element-wise RORQ tiers, +0.07 with deployable tier
            slices, +2.7 with 96 channel groups alone; docs/results.md), so both presets start at A5.
        keep_final_conv_float: the decoder's 2-class ``conv1_1`` stays float, as in the paper.
        weights: how weights are rounded onto their searched grids: to the nearest level, or by GPTQ on the
            layer's quantized calibration inputs (:mod:`.weight_rounding`; grid values, so both backends export
            them); ``auto``: GPTQ below 8-bit weights, nearest at 8 (where GPTQ has little left to gain).
        bias_correction: after rounding, add each Linear/Conv's mean output error on the calibration rows to its
            bias (layers without a bias keep none).
        table_group: values per float32 scale of the 4-bit word table (settings with 4-bit weights; the table is
            stored at export, not simulated). 128 for the presets: lavt-tiny's float model with the table so stored
            scores as with the float table (97.27 vs 97.28 mIoU, first 1,000 val pairs; 32: 97.28), and the scales
            take 1.1 MB less than at 32. Artifacts written before this field existed used 32, its default.
        layer_weight_bits: (layer name, bits) pairs whose weights differ from ``weight_bits``: mixed precision, as
            chosen under a size budget by :mod:`.bit_allocation`. Empty for a uniform setting.
        seed: sampling seed.
    """

    method: str = "ptq4ris"
    weight_bits: int = 8
    act_bits: int = 8
    weight_granularity: str = "per_channel"
    act_symmetric: bool = False
    act_init: str = "minmax"
    percentile: float = 99.99
    softmax: str = "drq"
    gelu: str = "drq"
    text: str = "tiers"
    text_groups: int = 0
    text_tiers: int = 0
    pwam: str = "groups"
    pwam_groups: int = 16
    search: str = "hessian"
    candidates: int = 100
    alpha_min: float = 0.01
    alpha_max: float = 1.19
    rounds: int = 3
    refresh: str = "block"
    max_rows: int = 2048
    screen_rows: int = 256
    refine: int = 16
    gelu_pow2: bool = False
    drq_min_bits: int = 5
    keep_final_conv_float: bool = True
    weights: str = "nearest"
    bias_correction: bool = False
    table_group: int = 32
    layer_weight_bits: tuple[tuple[str, int], ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise UserError(f"{name}={getattr(self, name)!r} is not one of {allowed}")
        for name in ("weight_bits", "act_bits"):
            if not 2 <= getattr(self, name) <= 8:
                raise UserError(f"{name} must be in 2..8, got {getattr(self, name)}")
        if self.drq_min_bits < 3:
            raise UserError(
                f"drq_min_bits must be at least 3 (DRQ spends b−1 bits per region), got {self.drq_min_bits}"
            )
        if self.text_tiers < 0 or self.text_tiers > 10:
            raise UserError(f"text_tiers must be in 0..10 (0: by bits), got {self.text_tiers}")
        if self.text_groups < 0 or self.pwam_groups < 0:
            raise UserError(
                f"text_groups and pwam_groups must be >= 0 (0: by bits), got {self.text_groups}, {self.pwam_groups}"
            )
        if min(self.candidates, self.rounds, self.max_rows, self.screen_rows, self.refine) < 1:
            raise UserError("candidates, rounds, max_rows, screen_rows and refine must be positive")
        if self.table_group not in (32, 64, 128):
            raise UserError(f"table_group must be 32, 64 or 128, got {self.table_group}")
        # A JSON round trip gives lists; the recipe is frozen and hashed as tuples, in layer-name order.
        pairs = tuple(sorted((str(name), int(bits)) for name, bits in self.layer_weight_bits))
        object.__setattr__(self, "layer_weight_bits", pairs)
        if any(not 2 <= bits <= 8 for _, bits in pairs) or len({name for name, _ in pairs}) != len(pairs):
            raise UserError(f"layer_weight_bits must name each layer once with bits in 2..8, got {pairs}")
        if not 0 < self.alpha_min < self.alpha_max:
            raise UserError(f"need 0 < alpha_min < alpha_max, got {self.alpha_min}, {self.alpha_max}")

    @property
    def text_group_count(self) -> int:
        """The channel groups per text Linear input this recipe uses (``text_groups``, or its by-bits default)."""
        return self.text_groups or (2 if self.act_bits == 8 else 8)

    @property
    def text_tier_count(self) -> int:
        """At most this many magnitude tiers per text Linear input with ``text="groups"`` (1: channel groups only)."""
        if self.text_tiers:
            return self.text_tiers
        return 1 if self.act_bits == 8 else 10

    @property
    def pwam_group_count(self) -> int:
        """The channel groups per PWAM fusion input this recipe uses (1: one grid, as ``pwam="plain"``)."""
        if self.pwam == "plain":
            return 1
        if self.pwam_groups:
            return self.pwam_groups
        return 1 if (self.weight_bits, self.act_bits) == (8, 8) else 16

    @property
    def pwam_grouped(self) -> bool:
        """Whether PWAM's fusion inputs get range-ordered channel groups (else one grid each)."""
        return self.pwam_group_count > 1

    @property
    def weight_rounding(self) -> str:
        """How this recipe rounds the weights of a ``weight_bits`` layer: ``nearest`` or ``gptq``."""
        return self.rounding_at(self.weight_bits)

    def rounding_at(self, bits: int) -> str:
        """How a layer with ``bits``-bit weights is rounded (``weights``, or its by-bits default: GPTQ below 8)."""
        if self.weights == "auto":
            return "gptq" if bits < 8 else "nearest"
        return self.weights

    def weight_bits_of(self, layer: str) -> int:
        """The weight bits of ``layer`` (its entry in ``layer_weight_bits``, else ``weight_bits``)."""
        return dict(self.layer_weight_bits).get(layer, self.weight_bits)

    @property
    def table_bits(self) -> int:
        """The word table's bits once exported: 4 with 4-bit weights (an 8-bit table would dominate the file)."""
        return 4 if self.weight_bits <= 4 else 8

    @property
    def mixed(self) -> bool:
        """Whether some layer's weight bits differ from ``weight_bits``."""
        return any(bits != self.weight_bits for _, bits in self.layer_weight_bits)

    @property
    def min_weight_bits(self) -> int:
        return min([self.weight_bits] + [bits for _, bits in self.layer_weight_bits])

    @property
    def softmax_drq(self) -> bool:
        """Whether post-softmax inputs get DRQ at this bit setting."""
        return self.softmax == "drq" and self.act_bits >= self.drq_min_bits

    @property
    def gelu_drq(self) -> bool:
        """Whether post-GELU inputs get DRQ at this bit setting."""
        return self.gelu == "drq" and self.act_bits >= self.drq_min_bits

    @property
    def bits(self) -> str:
        """``w4a8``; a mixed setting lists its weight widths, base first: ``w4/8a8``."""
        widths = [self.weight_bits] + sorted({b for _, b in self.layer_weight_bits} - {self.weight_bits})
        return f"w{'/'.join(map(str, widths))}a{self.act_bits}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise UserError(f"unknown recipe fields {sorted(unknown)}: the artifact was written by another version")
        return cls(**data)


_PTQ4RIS = Recipe(table_group=128)
METHODS: dict[str, Recipe] = {
    # Naive baselines: no search, nothing special for softmax/GELU/text/fusion.
    "minmax": replace(
        _PTQ4RIS,
        method="minmax",
        weight_granularity="per_tensor",
        softmax="uniform",
        gelu="uniform",
        text="uniform",
        pwam="plain",
        search="none",
    ),
    "percentile": replace(
        _PTQ4RIS,
        method="percentile",
        act_init="percentile",
        softmax="uniform",
        gelu="uniform",
        text="uniform",
        pwam="plain",
        search="none",
    ),
    # PTQ4ViT: twin-uniform softmax/GELU, Hessian-guided search, per-tensor symmetric grids, no text treatment.
    "ptq4vit": replace(
        _PTQ4RIS,
        method="ptq4vit",
        weight_granularity="per_tensor",
        act_symmetric=True,
        text="uniform",
        pwam="plain",
    ),
    # PTQ4RIS as the paper's code reads (element-wise RORQ tiers), and its deployable form (channel groups).
    "ptq4ris": _PTQ4RIS,
    # Text tier slices and PWAM channel groups are sized by bits: each group or slice is one int8 GEMM once deployed.
    # GPTQ rounding below 8-bit weights (lavt-tiny W4A8, first 1,000 val pairs: 97.07 vs 96.65 mIoU to nearest).
    "ptq4ris-deploy": replace(_PTQ4RIS, method="ptq4ris-deploy", text="groups", pwam_groups=0, weights="auto"),
    # Ablations.
    # DRQ at every bit setting, so the ablation shows what DRQ alone does at A4 too.
    "drq-only": replace(_PTQ4RIS, method="drq-only", text="uniform", drq_min_bits=3),
    "rorq-only": replace(_PTQ4RIS, method="rorq-only", softmax="uniform", gelu="uniform"),
}


METHOD_HELP = {
    "minmax": "min-max ranges, one scale per tensor, no search (BasePTQ-like)",
    "percentile": "activations clipped at the 99.99th percentile, per-channel weights, no search",
    "ptq4vit": "twin-uniform softmax/GELU, per-tensor symmetric grids, Hessian-guided search",
    "ptq4ris": "PTQ4RIS: DRQ (from A5 up) + element-wise RORQ tiers (the paper's code), PWAM channel groups, "
    "Hessian search",
    "ptq4ris-deploy": "PTQ4RIS with RORQ as range-ordered channel groups folded into the weights, plus magnitude "
    "tier slices below A8, each an int8 stream, and GPTQ weight rounding below 8-bit weights (deployable)",
    "drq-only": "ablation: PTQ4RIS without RORQ (DRQ at every bit setting, A4 included)",
    "rorq-only": "ablation: PTQ4RIS without DRQ",
}


def parse_bits(bits: str) -> tuple[int, int]:
    try:
        return BIT_SETTINGS[bits.lower()]
    except KeyError:
        raise UserError(f"unknown bit setting {bits!r}: choose one of {', '.join(BIT_SETTINGS)}") from None


def make_recipe(method: str, bits: str, **overrides: Any) -> Recipe:
    """The preset ``method`` at ``bits`` (``w8a8`` …), with field overrides (e.g. ``pwam="plain"``)."""
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    weight_bits, act_bits = parse_bits(bits)
    return replace(METHODS[method], weight_bits=weight_bits, act_bits=act_bits, **overrides)
