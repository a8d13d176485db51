"""Which role each layer of a model plays in quantization, declared once as data.

Placement reads a layer's modality, refresh block and input role here; channel-permutation folding reads which
modules produce and consume each folded activation; calibration reads where those activations' ranges are measured;
export reads which program (text or visual) a module runs in. A model class carries its table as the class attribute
``layer_roles`` (like transformers' ``base_model_prefix``), so code holding a bare module finds it, and its registry
card (:class:`~quantize.models.registry.ModelCard`) names the same table.

Patterns are module paths with ``{placeholder}`` fields, each standing for one non-negative integer index
(``backbone.layers.{stage}.blocks.{block}.mlp.fc2``), matched against the whole name. A block template uses the same
fields (``backbone.layers.{stage}.blocks.{block}``). Module paths equal LAVT's checkpoint keys (``yz93/LAVT-RIS``,
MIT), so this table is the one place outside the modeling files that spells them.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

__all__ = [
    "LAVT_ROLES",
    "MODALITIES",
    "ROLES",
    "FoldGroup",
    "LayerRoles",
    "NormFold",
    "Program",
    "Rule",
    "SiteRole",
    "UnknownLayerError",
    "layer_roles",
    "match",
]

# The parts of the model, in data-flow order (the text encoder feeds every fusion; the decoder comes last).
MODALITIES = ("text", "vision", "fusion", "decoder")
# What feeds a layer's (first) input, which decides its activation quantizer.
ROLES = (
    "post_softmax",  # attention probabilities (probs @ v): DRQ softmax regions
    "post_gelu",  # GELU output: DRQ GELU regions
    "post_relu",  # ReLU output: non-negative
    "text",  # a text-encoder Linear input: BERT outlier channels, RORQ tiers or groups
    "text_features",  # the text encoder's output entering PWAM: RORQ groups with the PWAM product
    "pwam_product",  # PWAM's vis ⊙ lang: RORQ groups
    "image",  # the normalised input image
    "generic",  # anything else: one uniform grid
)

_FIELD = re.compile(r"\{([A-Za-z_]\w*)\}")


class UnknownLayerError(ValueError):
    """A module name no rule of the table covers (or that two rules cover)."""


@functools.cache
def _compile(pattern: str) -> re.Pattern:
    """``a.{i}.b`` → a full-match regex with one named group of digits per field, compiled once per pattern."""
    out, pos = [], 0
    for m in _FIELD.finditer(pattern):
        out.append(re.escape(pattern[pos : m.start()]))
        out.append(f"(?P<{m.group(1)}>[0-9]+)")
        pos = m.end()
    out.append(re.escape(pattern[pos:]))
    return re.compile("".join(out))


def _fields(pattern: str) -> set[str]:
    return set(_FIELD.findall(pattern))


def _check_pattern(pattern: str, what: str) -> None:
    if not pattern or "{" in _FIELD.sub("", pattern) or "}" in _FIELD.sub("", pattern):
        raise ValueError(f"{what}: malformed pattern {pattern!r} (fields are {{name}}, one integer index each)")
    names = _FIELD.findall(pattern)
    if len(names) != len(set(names)):
        raise ValueError(f"{what}: pattern {pattern!r} repeats a field")


def match(pattern: str, name: str) -> dict[str, str] | None:
    """The field values of ``name`` under ``pattern`` (as the digits appear in the name), or None."""
    m = _compile(pattern).fullmatch(name)
    return None if m is None else m.groupdict()


@dataclass(frozen=True)
class Rule:
    """The role of every module whose path matches ``pattern``.

    Args:
        pattern: module path with ``{field}`` indices, e.g. ``backbone.layers.{stage}.blocks.{block}.mlp.fc2``.
        modality: one of :data:`MODALITIES`.
        block: the refresh group the module is calibrated with, a template over the pattern's fields.
        role: what feeds the module's input, one of :data:`ROLES`.
        weight_blocks: row blocks that get one weight scale each when weights are per tensor (PTQ4ViT): a fused
            q/k/v Linear holds three projections with different ranges.
    """

    pattern: str
    modality: str
    block: str
    role: str
    weight_blocks: int = 1

    def __post_init__(self) -> None:
        _check_pattern(self.pattern, "Rule")
        if self.modality not in MODALITIES:
            raise ValueError(f"Rule {self.pattern!r}: modality {self.modality!r} is not one of {MODALITIES}")
        if self.role not in ROLES:
            raise ValueError(f"Rule {self.pattern!r}: role {self.role!r} is not one of {ROLES}")
        unknown = _fields(self.block) - _fields(self.pattern)
        if unknown:
            raise ValueError(f"Rule {self.pattern!r}: block {self.block!r} uses fields {sorted(unknown)} it lacks")
        if self.weight_blocks < 1:
            raise ValueError(f"Rule {self.pattern!r}: weight_blocks must be >= 1, got {self.weight_blocks}")


@dataclass(frozen=True)
class Program:
    """A deployed program and the top-level module subtrees that run in it."""

    name: str
    modules: tuple[str, ...]


@dataclass(frozen=True)
class FoldGroup:
    """One activation whose channels are reordered by calibrated range (deployable RORQ groups), the permutation
    folded into every module that writes or reads it (:mod:`quantize.calibration.folding`).

    Args:
        name: the group's key in calibration reports.
        quantizers: the channel-grouped quantizers that need this order: ``text`` (RORQ groups on the text
            encoder's Linear inputs) and/or ``pwam`` (PWAM's product and text-feature groups).
        measured: modules whose input ranges decide the order (the channel-wise max over all of them).
        rows: modules that write the channels: output rows and bias move (Linear, Conv1d, affine norms).
        columns: modules that read the channels: weight columns move (Linear, Conv1d, embedding tables).
        head_rows: rows that move by whole heads only: an attention's q and k, whose scores need only the head order.
        heads: the attention module (``num_heads``, ``head_dim``) whose heads a permutation must keep contiguous.
        per: one permutation per value of this field (``layer``, ``stage``); None: one for the whole model.
        after: groups folded before this group's ranges are measured: each fold reorders float sums downstream,
            and the order is measured on the model they leave, which is the one that gets quantized.
    """

    name: str
    quantizers: tuple[str, ...]
    measured: tuple[str, ...]
    rows: tuple[str, ...] = ()
    columns: tuple[str, ...] = ()
    head_rows: tuple[str, ...] = ()
    heads: str | None = None
    per: str | None = None
    after: tuple[str, ...] = ()

    @property
    def patterns(self) -> tuple[str, ...]:
        """Every module pattern of the group: the modules whose weights move, then the measured ones."""
        return self.rows + self.head_rows + self.columns + self.measured

    def __post_init__(self) -> None:
        what = f"FoldGroup {self.name!r}"
        if not set(self.quantizers) <= {"text", "pwam"} or not self.quantizers:
            raise ValueError(
                f"{what}: quantizers must be a non-empty subset of ('text', 'pwam'), got {self.quantizers}"
            )
        if not self.measured or not (self.rows or self.head_rows) or not self.columns:
            raise ValueError(f"{what}: needs measured, row (producer) and column (consumer) modules")
        if bool(self.head_rows) != (self.heads is not None):
            raise ValueError(f"{what}: head_rows and heads go together")
        for p in self.patterns + ((self.heads,) if self.heads else ()):
            _check_pattern(p, what)
            # A pattern without the per-field would be permuted once per index instead of once.
            if self.per is not None and self.per not in _fields(p):
                raise ValueError(f"{what}: pattern {p!r} lacks the field {{{self.per}}} it is folded per")


@dataclass(frozen=True)
class NormFold:
    """A BatchNorm folded into the conv before it (as any deployment does), so simulated weights are deployed ones."""

    norm: str
    into: str

    def __post_init__(self) -> None:
        _check_pattern(self.norm, "NormFold")
        if _fields(self.into) != _fields(self.norm):
            raise ValueError(f"NormFold: {self.norm!r} and {self.into!r} must use the same fields")


@dataclass(frozen=True)
class SiteRole:
    """A module's entry in the table, resolved for its name."""

    name: str
    modality: str
    block: str
    role: str
    program: str
    weight_blocks: int
    rule: Rule


@dataclass(frozen=True)
class LayerRoles:
    """The roles of every quantized layer of one architecture, and the facts placement, folding and export read.

    Args:
        model: the architecture, for messages.
        rules: one :class:`Rule` per kind of quantized layer; every quantized module matches exactly one.
        programs: the deployed programs and the module subtrees each runs; every module is in exactly one.
        fold_groups: the channel permutations deployable RORQ folds, in folding order.
        norm_folds: BatchNorms folded into their convs before placement.
        word_table: the embedding table looked up by token id (stored in 8 or 4 bits once exported).
        position_table: the embedding table looked up by token position: a program of fixed sentence length reads
            its first rows only, and constant propagation stores just those.
        output_head: the final class conv, which recipes may keep float (as the paper does).
    """

    model: str
    rules: tuple[Rule, ...]
    programs: tuple[Program, ...]
    fold_groups: tuple[FoldGroup, ...] = ()
    norm_folds: tuple[NormFold, ...] = ()
    word_table: str | None = None
    position_table: str | None = None
    output_head: str | None = None

    def __post_init__(self) -> None:
        patterns = [r.pattern for r in self.rules]
        repeated = sorted({p for p in patterns if patterns.count(p) > 1})
        if repeated:
            raise ValueError(f"{self.model} layer roles: patterns {repeated} are declared twice")
        tops = [m for p in self.programs for m in p.modules]
        if len(tops) != len(set(tops)):
            raise ValueError(f"{self.model} layer roles: a module subtree is in two programs: {tops}")
        for r in self.rules:
            self.program_of(r.pattern)  # every rule lies in one program
        seen = set()
        for g in self.fold_groups:
            missing = set(g.after) - seen
            if missing:
                raise ValueError(
                    f"{self.model} layer roles: fold group {g.name!r} comes after {sorted(missing)}, "
                    "which are not declared before it"
                )
            seen.add(g.name)

    # ------------------------------------------------------------------------------------------------ lookups
    def site(self, name: str) -> SiteRole:
        """The role of the quantized module ``name``; :class:`UnknownLayerError` unless exactly one rule matches."""
        found = [(r, f) for r in self.rules if (f := match(r.pattern, name)) is not None]
        if len(found) != 1:
            if not found:
                raise UnknownLayerError(
                    f"no {self.model} layer role is declared for module {name!r}: add a Rule for it to the "
                    "model's layer_roles (quantize/models/roles.py), so placement knows its modality, block and role"
                )
            raise UnknownLayerError(
                f"module {name!r} matches {len(found)} {self.model} layer-role rules "
                f"({', '.join(r.pattern for r, _ in found)}): a module must match exactly one"
            )
        rule, values = found[0]
        return SiteRole(
            name, rule.modality, rule.block.format(**values), rule.role, self.program_of(name), rule.weight_blocks, rule
        )

    def program_of(self, name: str) -> str:
        """The program the module ``name`` (or any module below it) runs in."""
        for program in self.programs:
            if any(name == top or name.startswith(top + ".") for top in program.modules):
                return program.name
        subtrees = ", ".join(f"{p.name}: {', '.join(p.modules)}" for p in self.programs)
        raise UnknownLayerError(f"module {name!r} is in no {self.model} program ({subtrees})")

    def fold_group(self, name: str) -> FoldGroup:
        for g in self.fold_groups:
            if g.name == name:
                return g
        raise ValueError(
            f"unknown fold group {name!r}: {self.model} declares {', '.join(g.name for g in self.fold_groups)}"
        )

    # ------------------------------------------------------------------------------------------------ on a model
    @staticmethod
    def find(model: nn.Module, pattern: str, **fields: int) -> list[str]:
        """Names of the modules of ``model`` matching ``pattern`` whose fields equal ``fields``, in module order."""
        want = {k: str(v) for k, v in fields.items()}
        out = []
        for name, _ in model.named_modules():
            values = match(pattern, name)
            if values is not None and all(values.get(k) == v for k, v in want.items()):
                out.append(name)
        return out

    @staticmethod
    def indices(model: nn.Module, pattern: str, field: str) -> list[int]:
        """The values ``field`` takes over the modules of ``model`` matching ``pattern``, ascending."""
        values = {int(v[field]) for name, _ in model.named_modules() if (v := match(pattern, name)) is not None}
        return sorted(values)


def layer_roles(model: nn.Module) -> LayerRoles:
    """The :class:`LayerRoles` a model's class declares (``layer_roles``), or TypeError."""
    roles = getattr(model, "layer_roles", None)
    if not isinstance(roles, LayerRoles):
        raise TypeError(
            f"{type(model).__name__} declares no layer_roles: expected a model such as LAVT whose class carries a "
            "LayerRoles table (quantize/models/roles.py)"
        )
    return roles


# ---------------------------------------------------------------------------------------------------- LAVT
_BERT = "text_encoder.encoder.layer.{layer}"
_SWIN = "backbone.layers.{stage}.blocks.{block}"
_STAGE = "backbone.layers.{stage}"
_PWAM = "backbone.layers.{stage}.fusion"


def _text(suffix: str, role: str = "text") -> Rule:
    return Rule(f"{_BERT}.{suffix}", "text", _BERT, role)


def _swin(suffix: str, role: str = "generic", weight_blocks: int = 1) -> Rule:
    return Rule(f"{_SWIN}.{suffix}", "vision", _SWIN, role, weight_blocks)


def _fusion(suffix: str, role: str = "generic") -> Rule:
    # The language gate (res_gate) belongs to the stage, not the PWAM, but is calibrated with it.
    return Rule(f"{_STAGE}.{suffix}", "fusion", _PWAM, role)


def _decoder(name: str, role: str = "generic") -> Rule:
    return Rule(f"classifier.{name}", "decoder", "classifier", role)


LAVT_ROLES = LayerRoles(
    model="LAVT",
    rules=(
        # BERT: every Linear input is "text" whatever precedes it (output.dense reads a GELU): the outlier channels
        # of BERT-family activations call for RORQ rather than DRQ. Text attention keeps uniform softmax grids.
        _text("attention.self.query"),
        _text("attention.self.key"),
        _text("attention.self.value"),
        _text("attention.self.core.qk", "generic"),
        _text("attention.self.core.pv", "post_softmax"),
        _text("attention.output.dense"),
        _text("intermediate.dense"),
        _text("output.dense"),
        # Swin
        Rule("backbone.patch_embed.proj", "vision", "backbone.patch_embed", "image"),
        _swin("attn.qkv", weight_blocks=3),
        _swin("attn.proj"),
        _swin("attn.core.qk"),
        _swin("attn.core.pv", "post_softmax"),
        _swin("mlp.fc1"),
        _swin("mlp.fc2", "post_gelu"),
        # PWAM and language gate, one block per stage
        _fusion("fusion.vis_project.0"),
        _fusion("fusion.image_lang_att.f_key.0", "text_features"),
        _fusion("fusion.image_lang_att.f_query.0"),
        _fusion("fusion.image_lang_att.f_value.0", "text_features"),
        _fusion("fusion.image_lang_att.W.0"),
        _fusion("fusion.image_lang_att.core.qk"),
        _fusion("fusion.image_lang_att.core.pv", "post_softmax"),
        _fusion("fusion.project_mm.0", "pwam_product"),
        _fusion("res_gate.0", "post_gelu"),  # reads the PWAM output, GELU(project_mm)
        _fusion("res_gate.2", "post_relu"),
        # Patch merging is a Swin layer, but one too small for a block of its own: it is calibrated with the fusion
        # that precedes it.
        Rule(f"{_STAGE}.downsample.reduction", "vision", _PWAM, "generic"),
        # Decoder: each conv1_X reads upsampled features concatenated with a skip, each conv2_X a ReLU.
        _decoder("conv1_4"),
        _decoder("conv1_3"),
        _decoder("conv1_2"),
        _decoder("conv2_{level}", "post_relu"),
        _decoder("conv1_1", "post_relu"),
    ),
    # The Android app runs the text encoder once per sentence and the rest once per frame.
    programs=(Program("text", ("text_encoder",)), Program("visual", ("backbone", "classifier"))),
    fold_groups=(
        # BERT's residual stream: the embeddings write it, every sub-block reads it and writes back through its
        # output projection and LayerNorm, and the PWAMs read the final features. q/k/v read the same input, as do
        # f_key/f_value, so one of each is measured.
        FoldGroup(
            "text_hidden",
            quantizers=("text", "pwam"),
            measured=(
                f"{_BERT}.attention.self.query",
                f"{_BERT}.intermediate.dense",
                f"{_PWAM}.image_lang_att.f_key.0",
            ),
            rows=(
                "text_encoder.embeddings.LayerNorm",
                f"{_BERT}.attention.output.dense",
                f"{_BERT}.attention.output.LayerNorm",
                f"{_BERT}.output.dense",
                f"{_BERT}.output.LayerNorm",
            ),
            # The residual stream is the sum of the three tables, so all three move together.
            columns=(
                "text_encoder.embeddings.word_embeddings",
                "text_encoder.embeddings.position_embeddings",
                "text_encoder.embeddings.token_type_embeddings",
                f"{_BERT}.attention.self.query",
                f"{_BERT}.attention.self.key",
                f"{_BERT}.attention.self.value",
                f"{_BERT}.intermediate.dense",
                f"{_PWAM}.image_lang_att.f_key.0",
                f"{_PWAM}.image_lang_att.f_value.0",
            ),
        ),
        # The FFN hidden channels: GELU is element-wise, so it passes the order on.
        FoldGroup(
            "text_intermediate",
            quantizers=("text",),
            measured=(f"{_BERT}.output.dense",),
            rows=(f"{_BERT}.intermediate.dense",),
            columns=(f"{_BERT}.output.dense",),
            per="layer",
            after=("text_hidden",),
        ),
        # The attention context, head-major: v's channels pass through the probabilities to the context; q and k
        # only need the head order, as q·kᵀ sums over a head's channels.
        FoldGroup(
            "text_context",
            quantizers=("text",),
            measured=(f"{_BERT}.attention.output.dense",),
            rows=(f"{_BERT}.attention.self.value",),
            head_rows=(f"{_BERT}.attention.self.query", f"{_BERT}.attention.self.key"),
            heads=f"{_BERT}.attention.self",
            columns=(f"{_BERT}.attention.output.dense",),
            per="layer",
            after=("text_hidden",),
        ),
        # PWAM's product vis ⊙ lang: both factors move. vis passes a GELU, lang an affine-free InstanceNorm, both
        # per channel.
        FoldGroup(
            "pwam_product",
            quantizers=("pwam",),
            measured=(f"{_PWAM}.project_mm.0",),
            rows=(f"{_PWAM}.vis_project.0", f"{_PWAM}.image_lang_att.W.0"),
            columns=(f"{_PWAM}.project_mm.0",),
            per="stage",
            after=("text_hidden", "text_intermediate", "text_context"),
        ),
    ),
    norm_folds=(NormFold("classifier.bn{conv}_{level}", "classifier.conv{conv}_{level}"),),
    word_table="text_encoder.embeddings.word_embeddings",
    position_table="text_encoder.embeddings.position_embeddings",
    output_head="classifier.conv1_1",
)
