"""lavt-b's state dict equals the official lavt_one layout; official files load strictly; bad files fail clearly."""

from __future__ import annotations

import argparse
import logging
import os

import pytest
import torch

from quantize.models import CheckpointMismatchError, build_model, load_checkpoint
from quantize.models.lavt import LAVT
from tests.test_models import tiny_config


def official_lavt_one_layout() -> dict[str, tuple[int, ...]]:
    """The official lavt_one checkpoint's keys and shapes, written from its published description (method.md),
    independently of our modules."""
    out: dict[str, tuple[int, ...]] = {}
    b = "backbone."
    out[b + "patch_embed.proj.weight"] = (128, 3, 4, 4)
    out[b + "patch_embed.proj.bias"] = (128,)
    out[b + "patch_embed.norm.weight"] = (128,)
    out[b + "patch_embed.norm.bias"] = (128,)
    for i, (depth, heads) in enumerate(zip((2, 2, 18, 2), (4, 8, 16, 32))):
        C = 128 * 2**i
        s = f"{b}layers.{i}."
        for j in range(depth):
            k = f"{s}blocks.{j}."
            out.update({k + "norm1.weight": (C,), k + "norm1.bias": (C,)})
            out[k + "attn.relative_position_bias_table"] = (529, heads)
            out[k + "attn.relative_position_index"] = (144, 144)
            out.update({k + "attn.qkv.weight": (3 * C, C), k + "attn.qkv.bias": (3 * C,)})
            out.update({k + "attn.proj.weight": (C, C), k + "attn.proj.bias": (C,)})
            out.update({k + "norm2.weight": (C,), k + "norm2.bias": (C,)})
            out.update({k + "mlp.fc1.weight": (4 * C, C), k + "mlp.fc1.bias": (4 * C,)})
            out.update({k + "mlp.fc2.weight": (C, 4 * C), k + "mlp.fc2.bias": (C,)})
        f = s + "fusion."
        out.update({f + "vis_project.0.weight": (C, C, 1), f + "vis_project.0.bias": (C,)})
        for name, cin in (("f_key", 768), ("f_query", C), ("f_value", 768), ("W", C)):
            out[f"{f}image_lang_att.{name}.0.weight"] = (C, cin, 1)
            out[f"{f}image_lang_att.{name}.0.bias"] = (C,)
        out.update({f + "project_mm.0.weight": (C, C, 1), f + "project_mm.0.bias": (C,)})
        out.update({s + "res_gate.0.weight": (C, C), s + "res_gate.2.weight": (C, C)})
        if i < 3:
            out[s + "downsample.reduction.weight"] = (2 * C, 4 * C)
            out.update({s + "downsample.norm.weight": (4 * C,), s + "downsample.norm.bias": (4 * C,)})
    for i in range(4):
        out.update({f"{b}norm{i}.weight": (128 * 2**i,), f"{b}norm{i}.bias": (128 * 2**i,)})
    c = "classifier."
    for name, cin in (("1_4", 1536), ("2_4", 512), ("1_3", 768), ("2_3", 512), ("1_2", 640), ("2_2", 512)):
        out[f"{c}conv{name}.weight"] = (512, cin, 3, 3)
        for p in ("weight", "bias", "running_mean", "running_var"):
            out[f"{c}bn{name}.{p}"] = (512,)
        out[f"{c}bn{name}.num_batches_tracked"] = ()
    out.update({c + "conv1_1.weight": (2, 512, 1, 1), c + "conv1_1.bias": (2,)})
    t = "text_encoder."
    out[t + "embeddings.word_embeddings.weight"] = (30522, 768)
    out[t + "embeddings.position_embeddings.weight"] = (512, 768)
    out[t + "embeddings.token_type_embeddings.weight"] = (2, 768)
    out.update({t + "embeddings.LayerNorm.weight": (768,), t + "embeddings.LayerNorm.bias": (768,)})
    for n in range(12):
        k = f"{t}encoder.layer.{n}."
        for lin in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            out.update({f"{k}{lin}.weight": (768, 768), f"{k}{lin}.bias": (768,)})
        out.update({k + "intermediate.dense.weight": (3072, 768), k + "intermediate.dense.bias": (3072,)})
        out.update({k + "output.dense.weight": (768, 3072), k + "output.dense.bias": (768,)})
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            out.update({f"{k}{ln}.weight": (768,), f"{k}{ln}.bias": (768,)})
    return out


@pytest.fixture(scope="module")
def lavt_b():
    return build_model("lavt-b", pretrained=False)


def test_lavt_b_state_dict_equals_official_layout(lavt_b):
    sd = lavt_b.state_dict()
    want = official_lavt_one_layout()
    assert len(want) == 648
    assert list(sd) == [k for k in sd if k in want] and set(sd) == set(want)
    assert {k: tuple(v.shape) for k, v in sd.items()} == want
    assert sd["backbone.layers.0.blocks.0.attn.relative_position_index"].dtype == torch.int64
    # official order: backbone, classifier, text_encoder; per stage blocks → fusion → res_gate → downsample
    tops = [k.split(".")[0] for k in sd]
    assert tops.index("classifier") > max(i for i, t in enumerate(tops) if t == "backbone")
    assert tops.index("text_encoder") > max(i for i, t in enumerate(tops) if t == "classifier")
    stage0 = [k.split(".")[3] for k in sd if k.startswith("backbone.layers.0.")]
    assert [x for i, x in enumerate(stage0) if i == 0 or stage0[i - 1] != x] == [
        "blocks", "fusion", "res_gate", "downsample"
    ]
    params = sum(v.numel() for k, v in lavt_b.named_parameters())
    assert round(params / 1e6, 1) == 227.7


def test_official_lavt_one_file_loads_strictly(lavt_b, tmp_path, caplog):
    """A file saved the way LAVT's train.py saves it: model state, optimizer-free, args Namespace, epoch."""
    sd = {k: torch.randn_like(v.float()).to(v.dtype) if v.is_floating_point() else v for k, v in lavt_b.state_dict().items()}
    # Newer transformers BertModel adds these; LAVT's file has neither.
    sd["text_encoder.embeddings.position_ids"] = torch.arange(512)[None]
    path = tmp_path / "lavt_one_refcoco.pth"
    torch.save({"model": sd, "args": argparse.Namespace(swin_type="base", window12=True), "epoch": 39}, path)
    with caplog.at_level(logging.INFO):  # expected drops are logged at INFO: the default build prints no warning
        model = build_model("lavt-b", checkpoint=path)
    assert "dropped text_encoder.embeddings.position_ids" in caplog.text
    got = model.state_dict()
    for k in ("backbone.layers.2.blocks.17.attn.qkv.weight", "classifier.bn1_4.running_var",
              "text_encoder.encoder.layer.11.output.LayerNorm.bias"):
        assert torch.equal(got[k], sd[k])


def test_older_lavt_layout_with_separate_bert(tmp_path):
    """Older 'lavt' files: BERT unprefixed under 'bert_model', the rest under 'model'."""
    model = LAVT(tiny_config())
    sd = {k: v.clone() + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    vision = {k: v for k, v in sd.items() if not k.startswith("text_encoder.")}
    bert = {k[len("text_encoder."):]: v for k, v in sd.items() if k.startswith("text_encoder.")}
    bert["pooler.dense.weight"] = torch.zeros(32, 32)
    path = tmp_path / "lavt.pth"
    torch.save({"model": vision, "bert_model": bert, "args": argparse.Namespace(lr=5e-5)}, path)
    fresh = LAVT(tiny_config())
    load_checkpoint(fresh, path)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_checkpoint_of_another_architecture_lists_keys(tmp_path):
    tiny = LAVT(tiny_config())
    path = tmp_path / "tiny.pth"
    sd = tiny.state_dict()
    sd["backbone.extra.weight"] = torch.zeros(1)
    del sd["classifier.conv1_1.bias"]
    torch.save({"model": sd}, path)
    other = LAVT(tiny_config(embed_dim=8, num_heads=(1, 2, 2, 4)))
    with pytest.raises(CheckpointMismatchError) as err:
        load_checkpoint(other, path)
    msg = str(err.value)
    assert "1 missing keys" in msg and "classifier.conv1_1.bias" in msg
    assert "1 unexpected keys" in msg and "backbone.extra.weight" in msg
    assert "mis-shaped" in msg and "backbone.patch_embed.proj.weight: checkpoint (16, 3, 4, 4) vs model (8, 3, 4, 4)" in msg


def test_checkpoint_with_arbitrary_pickle_is_refused(tmp_path):
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "payload": Evil()}, path)
    with pytest.raises(ValueError, match="could not be read as a PyTorch checkpoint"):
        load_checkpoint(LAVT(tiny_config()), path)
    assert not marker.exists()


def test_missing_and_corrupt_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(LAVT(tiny_config()), tmp_path / "nope.pth")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_checkpoint(LAVT(tiny_config()), bad)
