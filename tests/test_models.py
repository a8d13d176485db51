"""LAVT model tests: export-friendly forms equal the textbook forms, own BERT equals transformers', shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantize.models import LavtConfig, SwinConfig, build_model
from quantize.models.bert import BertModel
from quantize.models.checkpoint import load_text_encoder_weights
from quantize.models.layers import InstanceNorm1d, LayerNorm, cyclic_shift, window_partition, window_reverse
from quantize.models.lavt import LAVT
from quantize.models.pwam import PWAM
from quantize.models.registry import text_encoder_dir
from quantize.models.swin import (
    PatchMerging,
    SwinTransformerBlock,
    WindowAttention,
    relative_position_index,
    shifted_window_mask,
)

torch.manual_seed(0)
ATOL = 1e-5


def tiny_config(**swin) -> LavtConfig:
    """A LavtTester-style tiny config: small Swin, 2-layer BERT, runs in milliseconds."""
    args = dict(img_size=64, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=4, ape=True)
    args.update(swin)
    text = dict(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=64,
    )
    from transformers import BertConfig

    return LavtConfig(swin=SwinConfig(**args), text=BertConfig(**text).to_dict())


# ---- references written the straightforward way (official Swin / LAVT code structure) ---------------------------
def ref_window_partition(x, ws):
    B, H, W, C = x.shape
    x = x.view(B, H // ws, ws, W // ws, ws, C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, ws, ws, C)


def ref_window_attention(m: WindowAttention, x, mask):
    B_, N, C = x.shape
    h = m.num_heads
    qkv = m.qkv(x).reshape(B_, N, 3, h, C // h).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = (q * m.scale) @ k.transpose(-2, -1)
    rpb = m.relative_position_bias_table[m.relative_position_index.view(-1)].view(N, N, -1).permute(2, 0, 1)
    attn = attn + rpb.unsqueeze(0)
    if mask is not None:
        nW = mask.shape[0]
        attn = attn.view(B_ // nW, nW, h, N, N) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, h, N, N)
    attn = attn.softmax(-1)
    return m.proj((attn @ v).transpose(1, 2).reshape(B_, N, C))


def ref_block(blk: SwinTransformerBlock, x):
    B, L, C = x.shape
    H = W = blk.resolution
    ws, s = blk.window_size, blk.shift_size
    shortcut = x
    x = F.layer_norm(x, (C,), blk.norm1.weight, blk.norm1.bias, blk.norm1.eps).view(B, H, W, C)
    pad = (ws - W % ws) % ws
    x = F.pad(x, (0, 0, 0, pad, 0, pad))
    Hp = Wp = H + pad
    if s:
        x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
    win = ref_window_partition(x, ws).view(-1, ws * ws, C)
    win = ref_window_attention(blk.attn, win, blk.attn_mask if s else None).view(-1, ws, ws, C)
    x = win.view(B, Hp // ws, Wp // ws, ws, ws, -1).permute(0, 1, 3, 2, 4, 5).contiguous().view(B, Hp, Wp, -1)
    if s:
        x = torch.roll(x, shifts=(s, s), dims=(1, 2))
    x = shortcut + x[:, :H, :W, :].contiguous().view(B, H * W, C)
    y = F.layer_norm(x, (C,), blk.norm2.weight, blk.norm2.bias, blk.norm2.eps)
    return x + blk.mlp.fc2(F.gelu(blk.mlp.fc1(y)))


def ref_patch_merging(m: PatchMerging, x):
    B, L, C = x.shape
    H = W = m.resolution
    x = x.view(B, H, W, C)
    if H % 2:
        x = F.pad(x, (0, 0, 0, 1, 0, 1))
    x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1).view(B, -1, 4 * C)
    return m.reduction(F.layer_norm(x, (4 * C,), m.norm.weight, m.norm.bias, m.norm.eps))


def ref_pwam(m: PWAM, x, l, l_mask):
    """LAVT's PWAM as written upstream: 4-D matmuls, scale on q·k, nn.InstanceNorm1d."""
    att = m.image_lang_att
    B, HW = x.shape[:2]
    inorm = lambda t: F.instance_norm(t, eps=att.f_query[1].eps)  # noqa: E731
    vis = F.gelu(m.vis_project[0](x.permute(0, 2, 1)))
    lm = l_mask.permute(0, 2, 1)
    query = inorm(att.f_query[0](x.permute(0, 2, 1))).permute(0, 2, 1)
    key = att.f_key[0](l) * lm
    value = att.f_value[0](l) * lm
    h, n_l = att.num_heads, value.size(-1)
    query = query.reshape(B, HW, h, att.key_channels // h).permute(0, 2, 1, 3)
    key = key.reshape(B, h, att.key_channels // h, n_l)
    value = value.reshape(B, h, att.value_channels // h, n_l)
    sim = torch.matmul(query, key) * att.key_channels**-0.5
    sim = sim + (1e4 * lm.unsqueeze(1) - 1e4)
    out = torch.matmul(sim.softmax(-1), value.permute(0, 1, 3, 2))
    out = out.permute(0, 2, 1, 3).reshape(B, HW, att.value_channels).permute(0, 2, 1)
    lang = inorm(att.W[0](out))
    return F.gelu(m.project_mm[0](vis * lang)).permute(0, 2, 1)


# ---- tests ------------------------------------------------------------------------------------------------------
def test_layer_norm_equals_torch():
    ln = LayerNorm(24, eps=1e-6)
    nn.init.normal_(ln.weight)
    nn.init.normal_(ln.bias)
    x = torch.randn(3, 7, 24) * 5 + 2
    torch.testing.assert_close(ln(x), F.layer_norm(x, (24,), ln.weight, ln.bias, 1e-6), atol=ATOL, rtol=0)


def test_instance_norm_equals_torch():
    x = torch.randn(2, 8, 50) * 3 + 1
    torch.testing.assert_close(InstanceNorm1d(8)(x), nn.InstanceNorm1d(8)(x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("shift", [1, 3, -2, 6])
def test_cyclic_shift_equals_roll(shift):
    x = torch.randn(2, 6, 6, 3)
    torch.testing.assert_close(cyclic_shift(x, shift), torch.roll(x, (shift, shift), (1, 2)))


def test_window_partition_is_rank5_equivalent_and_invertible():
    x = torch.randn(2, 8, 12, 5)
    win = window_partition(x, 4)
    torch.testing.assert_close(win, ref_window_partition(x, 4).view(-1, 16, 5))
    torch.testing.assert_close(window_reverse(win, 4, 8, 12), x)


def test_relative_position_index_matches_swin_formula():
    idx = relative_position_index(3)
    assert idx.shape == (9, 9) and idx.dtype == torch.int64
    assert idx.min() == 0 and idx.max() == (2 * 3 - 1) ** 2 - 1
    assert torch.equal(idx.diagonal(), torch.full((9,), 12))  # zero offset sits at the table centre


@pytest.mark.parametrize("resolution,shift", [(8, 0), (8, 2), (6, 2), (3, 2)])
def test_swin_block_equals_reference(resolution, shift):
    """Includes padded maps (6 and 3 with window 4), where padded tokens take part in attention as in Swin."""
    blk = SwinTransformerBlock(16, resolution, 2, 4, shift, 4.0, True, 1e-5).eval()
    with torch.no_grad():
        blk.attn.relative_position_bias_table.normal_()
        x = torch.randn(2, resolution * resolution, 16)
        torch.testing.assert_close(blk(x), ref_block(blk, x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("resolution", [8, 5])
def test_patch_merging_equals_strided_slicing(resolution):
    m = PatchMerging(6, resolution, 1e-5)
    x = torch.randn(2, resolution * resolution, 6)
    torch.testing.assert_close(m(x), ref_patch_merging(m, x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("heads", [1, 2])
def test_pwam_equals_lavt_form(heads):
    m = PWAM(16, 16, 24, 16, 16, num_heads=heads).eval()
    x, l = torch.randn(2, 30, 16), torch.randn(2, 24, 7)
    l_mask = torch.ones(2, 7, 1)
    l_mask[1, 4:] = 0
    with torch.no_grad():
        torch.testing.assert_close(m(x, l, l_mask), ref_pwam(m, x, l, l_mask), atol=ATOL, rtol=0)


def test_shift_mask_separates_regions():
    mask = shifted_window_mask(8, 8, 4, 2)
    assert mask.shape == (4, 16, 16)
    assert torch.all(mask[0] == 0)  # the top-left window holds one region only
    assert set(mask.unique().tolist()) == {0.0, -100.0}
    assert torch.equal(mask, mask.transpose(1, 2))


def test_own_bert_equals_transformers_bert():
    from transformers import BertModel as HFBertModel

    path = text_encoder_dir()
    hf = HFBertModel.from_pretrained(str(path), add_pooling_layer=False).eval()
    ours = BertModel(hf.config).eval()
    load_text_encoder_weights(ours, path)
    ids = torch.randint(1000, 20000, (3, 20))
    ids[:, 0] = 101
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[1, 9:] = 0
    mask[2, 4:] = 0
    ids[mask == 0] = 0
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask)
    assert (got - want).abs().max().item() <= ATOL


def test_tiny_lavt_forward_shapes_and_language_dependence():
    cfg = tiny_config()
    model = LAVT(cfg).eval()
    with torch.no_grad():
        for gate in model.backbone.layers:  # zero-initialised gates would hide the language path
            nn.init.normal_(gate.res_gate[0].weight, std=0.3)
            nn.init.normal_(gate.res_gate[2].weight, std=0.3)
        x = torch.randn(2, 3, 64, 64)
        ids = torch.randint(1, 99, (2, 20))
        am = torch.ones(2, 20, dtype=torch.long)
        am[1, 6:] = 0
        out = model(x, ids, am)
        assert out.shape == (2, 2, 64, 64) and torch.isfinite(out).all()
        feats = model.backbone(x, model.encode_text(ids, am), am.float().unsqueeze(-1))
        assert [tuple(f.shape[1:]) for f in feats] == [(16, 16, 16), (32, 8, 8), (64, 4, 4), (128, 2, 2)]
        other = model(x, torch.randint(1, 99, (2, 20)), am)
        assert (other - out).abs().max() > 1e-3  # the sentence changes the mask logits
        # padded tokens must not matter
        ids2 = ids.clone()
        ids2[1, 6:] = 7
        torch.testing.assert_close(model(x, ids2, am)[1], out[1], atol=ATOL, rtol=0)


def test_model_rejects_wrong_image_size():
    model = LAVT(tiny_config()).eval()
    with pytest.raises(ValueError, match="expected images of 64x64"):
        model(torch.randn(1, 3, 48, 48), torch.ones(1, 20, dtype=torch.long), torch.ones(1, 20, dtype=torch.long))


def test_config_validation_and_roundtrip():
    with pytest.raises(ValueError, match="multiple of its"):
        SwinConfig(embed_dim=30, num_heads=(4, 8, 16, 32))
    with pytest.raises(ValueError, match="one entry per stage"):
        SwinConfig(depths=(2, 2), num_heads=(4, 8, 16))
    cfg = tiny_config()
    assert LavtConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown LavtConfig keys"):
        LavtConfig.from_dict({"swin": {}, "bogus": 1})


def test_derived_buffers_equal_recomputed():
    """Non-persistent shift masks and the stored relative_position_index equal what the formulas give."""
    model = LAVT(tiny_config())
    sd = model.state_dict()
    assert not any(k.endswith("attn_mask") for k in sd)
    blocks = [m for m in model.modules() if isinstance(m, SwinTransformerBlock)]
    assert any(b.shift_size for b in blocks)
    for blk in blocks:
        assert torch.equal(blk.attn.relative_position_index, relative_position_index(blk.window_size))
        if blk.shift_size:
            want = shifted_window_mask(blk.padded, blk.padded, blk.window_size, blk.shift_size)
            assert torch.equal(blk.attn_mask, want)


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="lavt-b, lavt-tiny"):
        build_model("lavt-xl")


def test_lavt_b_without_checkpoint_refuses():
    with pytest.raises(ValueError, match="--checkpoint"):
        build_model("lavt-b")
