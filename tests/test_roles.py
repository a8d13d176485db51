"""The layer-role table: every quantized layer of both registered models has exactly one role, unknown layers are
refused, fold groups and programs fit the models, and the table is the only place outside the modeling files that
spells LAVT's module paths."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from torch import nn

from quantize.calibration import calibrate, folding, placement
from quantize.calibration.placement import classify_site, float_sites
from quantize.deploy import calibrated_quantizer, graph, stages
from quantize.deploy.stages import in_stage
from quantize.models import build_model, list_models, model_config
from quantize.models.lavt import LAVT
from quantize.models.registry import model_card
from quantize.models.roles import (
    LAVT_ROLES,
    FoldGroup,
    LayerRoles,
    Program,
    Rule,
    UnknownLayerError,
    layer_roles,
    match,
)


@pytest.fixture(scope="module")
def tiny():
    return build_model("lavt-tiny").eval()


@pytest.fixture(scope="module")
def lavt_b():
    """lavt-b's architecture on the meta device: every module and shape of the paper's model, no weights."""
    with torch.device("meta"):
        return LAVT(model_config("lavt-b"))


def _quantizable(model: nn.Module) -> list[str]:
    """Every module of a quantized type, the final conv included (recipes may quantize it)."""
    recipe_all = type("R", (), {"keep_final_conv_float": False})()
    return [name for name, _, _ in float_sites(model, recipe_all)]


@pytest.mark.parametrize("which", ["tiny", "lavt_b"])
def test_every_quantized_layer_matches_exactly_one_rule(which, request):
    model = request.getfixturevalue(which)
    names = _quantizable(model)
    assert len(names) > 100
    used = set()
    for name in names:
        hits = [r for r in LAVT_ROLES.rules if match(r.pattern, name) is not None]
        assert len(hits) == 1, f"{name} matches {[r.pattern for r in hits]}"
        used.add(hits[0].pattern)
    # No dead rules: each one describes a layer both models have.
    assert used == {r.pattern for r in LAVT_ROLES.rules}


def test_roles_are_declared_once_per_model_and_reachable_from_the_module(tiny):
    for name in list_models():
        assert model_card(name).roles is LAVT_ROLES
    assert LAVT.layer_roles is LAVT_ROLES
    assert layer_roles(tiny) is LAVT_ROLES
    assert layer_roles(copy.deepcopy(tiny)) is LAVT_ROLES
    with pytest.raises(TypeError, match="declares no layer_roles"):
        layer_roles(nn.Linear(2, 2))


def test_site_roles_read_from_the_table():
    info = classify_site("backbone.layers.3.blocks.17.attn.qkv", nn.Linear(2, 6))
    assert (info.modality, info.block, info.role, info.weight_blocks) == (
        "vision",
        "backbone.layers.3.blocks.17",
        "generic",
        3,
    )
    info = classify_site("backbone.layers.1.downsample.reduction", nn.Linear(2, 2))
    assert (info.modality, info.block) == ("vision", "backbone.layers.1.fusion")
    info = classify_site("text_encoder.encoder.layer.11.attention.self.core.pv", placement.MatMul())
    assert (info.modality, info.block, info.role) == ("text", "text_encoder.encoder.layer.11", "post_softmax")
    assert classify_site("classifier.conv2_3", nn.Conv2d(2, 2, 3)).role == "post_relu"
    assert classify_site("classifier.conv1_3", nn.Conv2d(2, 2, 3)).role == "generic"
    assert classify_site("classifier.conv1_1", nn.Conv2d(2, 2, 1)).role == "post_relu"
    assert LAVT_ROLES.site("backbone.patch_embed.proj").block == "backbone.patch_embed"


@pytest.mark.parametrize(
    "name",
    [
        "backbone.extra_head",
        "backbone.layers.0.blocks.0.mlp.fc3",
        "backbone.layers.0.blocks.0.mlp.fc2.extra",  # patterns match whole names
        "backbone.layers.x.blocks.0.mlp.fc2",  # fields are integer indices
        "text_encoder.pooler.dense",
    ],
)
def test_unknown_layers_raise_a_clear_error(name):
    with pytest.raises(UnknownLayerError, match="no LAVT layer role is declared for module") as e:
        classify_site(name, nn.Linear(2, 2))
    assert repr(name) in str(e.value) and "roles.py" in str(e.value)
    # Modules of a type that is never quantized are not looked up.
    assert classify_site(name, nn.LayerNorm(2)) is None


def test_a_model_with_an_undeclared_layer_is_refused(tiny):
    model = copy.deepcopy(tiny)
    model.backbone.extra = nn.Linear(2, 2)
    with pytest.raises(UnknownLayerError, match="backbone.extra"):
        float_sites(model)


def test_overlapping_rules_and_bad_entries_are_refused():
    roles = LayerRoles(
        "toy",
        rules=(Rule("a.{i}.fc", "vision", "a.{i}", "generic"), Rule("a.0.fc", "vision", "a", "generic")),
        programs=(Program("visual", ("a",)),),
    )
    assert roles.site("a.1.fc").block == "a.1"
    with pytest.raises(UnknownLayerError, match="matches 2"):
        roles.site("a.0.fc")
    with pytest.raises(ValueError, match="role"):
        Rule("a.fc", "vision", "a", "post_tanh")
    with pytest.raises(ValueError, match="modality"):
        Rule("a.fc", "audio", "a", "generic")
    with pytest.raises(ValueError, match="fields"):
        Rule("a.fc", "vision", "a.{i}", "generic")
    with pytest.raises(ValueError, match="lacks the field"):
        FoldGroup("g", ("text",), measured=("a.{i}.fc",), rows=("a.x",), columns=("a.{i}.fc",), per="i")
    with pytest.raises(ValueError, match="in no toy program"):
        LayerRoles("toy", rules=(Rule("b.fc", "vision", "b", "generic"),), programs=(Program("visual", ("a",)),))


def test_programs_cover_each_top_level_module_once(tiny):
    for name, _ in tiny.named_children():
        assert sum(name in p.modules for p in LAVT_ROLES.programs) == 1
    for name in _quantizable(tiny):
        program = LAVT_ROLES.site(name).program
        assert program == ("text" if name.startswith("text_encoder.") else "visual")
        assert in_stage(f"model.{name}.streams.0", program) and in_stage(f"model.{name}", "full")
        assert not in_stage(f"model.{name}", {"text": "visual", "visual": "text"}[program])
    with pytest.raises(UnknownLayerError, match="no LAVT program"):
        in_stage("model.decoder_v2.conv", "visual")


def test_fold_groups_fit_both_models(tiny, lavt_b):
    for model in (tiny, lavt_b):
        for g in LAVT_ROLES.fold_groups:
            for pattern in g.patterns:
                assert LayerRoles.find(model, pattern), f"{g.name}: {pattern} matches nothing"
            if g.per is not None:
                counts = {p: LayerRoles.indices(model, p, g.per) for p in g.patterns}
                assert len({tuple(v) for v in counts.values()}) == 1, counts
    # Folding the identity through every group resolves every module and moves nothing.
    model = copy.deepcopy(tiny)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for g in LAVT_ROLES.fold_groups:
        indices = [None] if g.per is None else LayerRoles.indices(model, g.patterns[0], g.per)
        for index in indices:
            fields = {} if index is None else {g.per: index}
            first = LayerRoles.find(model, g.columns[-1], **fields)[0]
            width = model.get_submodule(first).weight.shape[1]
            folding.permute_group(model, g.name, torch.arange(width), index)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_table_is_the_only_place_that_spells_module_paths():
    modules = (placement, folding, calibrate, stages, graph, calibrated_quantizer)
    for module in modules:
        source = inspect.getsource(module)
        for spelled in (
            "text_encoder.encoder.layer",
            "backbone.layers",
            "text_encoder.",
            "word_embeddings",
            "classifier.conv",
            "attn.qkv",
            "re.match",
            "re.search",
        ):
            assert spelled not in source, f"{module.__name__} spells {spelled!r}: read it from the layer roles"
