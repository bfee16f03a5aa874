"""VisionTransformer: timm parity, weight loading, position-embedding resampling, intermediates, bad input."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer as TimmViT

import vision_attn
from vision_attn.layers import ConvTokenizer, SequencePool, ShiftedPatchEmbed
from vision_attn.models import VisionTransformer

SMALL = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, num_classes=7)

PARITY_CONFIGS = {
    "cls_token": {},
    "registers": dict(reg_tokens=4),
    "avg_pool_no_cls": dict(class_token=False, global_pool="avg"),
    "no_embed_class_layerscale": dict(reg_tokens=2, no_embed_class=True, init_values=1e-1),
    "qk_norm": dict(qk_norm=True),
}


@pytest.mark.parametrize("extra", PARITY_CONFIGS.values(), ids=PARITY_CONFIGS.keys())
def test_loads_timm_state_dict_and_matches_logits(extra):
    torch.manual_seed(0)
    timm_vit = TimmViT(**SMALL, **extra).eval()
    ours = VisionTransformer(**SMALL, **extra).eval()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in timm_vit.state_dict().items()}
    ours.load_state_dict(timm_vit.state_dict(), strict=True)
    assert ours.num_prefix_tokens == timm_vit.num_prefix_tokens
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), timm_vit(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.forward_features(x), timm_vit.forward_features(x), atol=1e-5, rtol=0)


def test_registered_224_config_matches_timm_and_loads_local_files(tmp_path):
    torch.manual_seed(0)
    timm_vit = timm.create_model("vit_tiny_patch16_224", depth=2).eval()
    torch.save(timm_vit.state_dict(), tmp_path / "vit.pth")
    save_file(timm_vit.state_dict(), str(tmp_path / "vit.safetensors"))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = timm_vit(x)
        for path in (tmp_path / "vit.pth", tmp_path / "vit.safetensors"):
            ours = vision_attn.create_model("va_vit_tiny_patch16_224", depth=2, checkpoint_path=path).eval()
            torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=0)
        # timm's own pretrained path with a local file (what pretrained=True does after download)
        ours = timm.create_model(
            "va_vit_tiny_patch16_224",
            depth=2,
            pretrained=True,
            pretrained_cfg_overlay=dict(file=str(tmp_path / "vit.pth")),
        ).eval()
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=0)
        # fine-tuning: a new head for 5 classes, every other weight loaded
        finetune = timm.create_model(
            "va_vit_tiny_patch16_224",
            depth=2,
            num_classes=5,
            pretrained=True,
            pretrained_cfg_overlay=dict(file=str(tmp_path / "vit.pth")),
        ).eval()
        torch.testing.assert_close(finetune.forward_features(x), timm_vit.forward_features(x), atol=1e-5, rtol=0)
        assert finetune(x).shape == (2, 5)


def test_pretrained_cfgs_point_at_timm_weights():
    for name, hub in [
        ("va_vit_tiny_patch16_224", "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k"),
        ("va_vit_small_patch16_224", "timm/vit_small_patch16_224.augreg_in21k_ft_in1k"),
        ("va_vit_base_patch16_224", "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k"),
    ]:
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.hf_hub_id == hub
        assert cfg.input_size == (3, 224, 224)
        assert cfg.num_classes == 1000


def test_checkpoint_filter_resamples_pos_embed_for_new_img_size(tmp_path):
    torch.manual_seed(0)
    src = vision_attn.create_model("va_vit_tiny_patch4_32", depth=1).eval()
    path = tmp_path / "w.safetensors"
    save_file(src.state_dict(), str(path))
    with pytest.raises(ValueError, match=r"pos_embed: file \(1, 65, 192\) vs model \(1, 145, 192\).*resample_weights"):
        vision_attn.create_model("va_vit_tiny_patch4_32", depth=1, img_size=48, checkpoint_path=path)
    big = vision_attn.create_model(
        "va_vit_tiny_patch4_32", depth=1, img_size=48, checkpoint_path=path, resample_weights=True
    )
    assert big.pos_embed.shape == (1, 1 + 12 * 12, 192)
    expected = resample_abs_pos_embed(src.pos_embed.detach(), new_size=(12, 12), num_prefix_tokens=1)
    torch.testing.assert_close(big.pos_embed.detach(), expected)
    # a dynamic-size model resamples on the fly to the same table
    dyn = VisionTransformer(**{**SMALL, "embed_dim": 192, "num_heads": 3, "depth": 1, "num_classes": 10},
                            mlp_ratio=2.0, dynamic_img_size=True).eval()  # fmt: skip
    dyn.load_state_dict(src.state_dict())
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(dyn(x), big.eval()(x), atol=1e-5, rtol=0)


def test_dynamic_img_size_non_square_matches_timm():
    torch.manual_seed(0)
    timm_vit = TimmViT(**SMALL, reg_tokens=2, dynamic_img_size=True).eval()
    ours = VisionTransformer(**SMALL, reg_tokens=2, dynamic_img_size=True).eval()
    ours.load_state_dict(timm_vit.state_dict())
    x = torch.randn(2, 3, 24, 40)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), timm_vit(x), atol=1e-5, rtol=0)


def test_sincos_pos_embed_is_fixed_and_regenerated_for_new_grids():
    model = VisionTransformer(**SMALL, pos_embed="sincos", dynamic_img_size=True)
    assert not model.pos_embed.requires_grad
    assert torch.count_nonzero(model.pos_embed[0, 0]) == 0  # class token slot
    assert model.pos_embed[0, 1:].std() > 0.1
    y = model(torch.randn(1, 3, 16, 48))
    assert y.shape == (1, 7)
    assert torch.isfinite(y).all()


def test_forward_intermediates_and_features_only():
    model = vision_attn.create_model("va_vit_tiny_patch4_32", depth=3, reg_tokens=2).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert len(inter) == 3
        assert inter[0].shape == (2, 192, 8, 8)
        torch.testing.assert_close(final, model.forward_features(x))
        nlc = model.forward_intermediates(x, indices=[0], output_fmt="NLC", intermediates_only=True)
        assert nlc[0].shape == (2, 64, 192)
        pairs = model.forward_intermediates(x, indices=1, return_prefix_tokens=True, intermediates_only=True)
        assert pairs[0][1].shape == (2, 3, 192)
        feats = timm.create_model("va_vit_tiny_patch4_32", depth=3, features_only=True, out_indices=(1, 2)).eval()
        maps = feats(x)
    assert [m.shape for m in maps] == [(2, 192, 8, 8)] * 2
    assert feats.feature_info.reduction() == [4, 4]


def test_reset_classifier_and_pre_logits():
    model = vision_attn.create_model("va_vit_tiny_patch4_32", depth=1)
    model.reset_classifier(3, global_pool="avg")
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 3)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 192)
    model.reset_classifier(0)
    assert model(x).shape == (2, 192)
    with pytest.raises(ValueError, match="global_pool 'seq'"):
        model.reset_classifier(3, global_pool="seq")


def test_cct_tokenizer_grid_and_sequence_pool():
    model = vision_attn.create_model("va_cct_7_3x1_32", depth=1)
    assert isinstance(model.patch_embed, ConvTokenizer)
    assert model.patch_embed.grid_size == (16, 16)
    assert model.num_prefix_tokens == 0
    assert model.pos_embed.shape == (1, 256, 256)
    assert vision_attn.create_model("va_cct_2_3x2_32", depth=1).patch_embed.grid_size == (8, 8)
    pool = SequencePool(8)
    tokens = torch.randn(2, 5, 8)
    pooled = pool(tokens)
    torch.testing.assert_close(pool(tokens[:, torch.randperm(5)]), pooled)  # permutation invariant
    weights = pool.attention_pool(tokens).softmax(dim=1)
    torch.testing.assert_close(pooled, (weights * tokens).sum(dim=1))


def test_shifted_patch_tokens_hold_the_four_diagonal_shifts():
    embed = ShiftedPatchEmbed(img_size=8, patch_size=4, in_chans=1, embed_dim=4)
    seen = {}
    embed.patch_norm.register_forward_hook(lambda m, args, out: seen.setdefault("x", args[0]))
    x = torch.arange(64.0).reshape(1, 1, 8, 8)
    embed(x)
    patches = seen["x"].reshape(1, 2, 2, 4, 4, 5)  # B, gh, gw, p1, p2, 5 channels
    assembled = patches.permute(0, 5, 1, 3, 2, 4).reshape(1, 5, 8, 8)
    torch.testing.assert_close(assembled[:, 0], x[:, 0])
    for channel, (dy, dx) in enumerate([(-2, -2), (-2, 2), (2, -2), (2, 2)], start=1):
        expected = torch.zeros(8, 8)
        for i in range(8):
            for j in range(8):
                if 0 <= i + dy < 8 and 0 <= j + dx < 8:
                    expected[i, j] = x[0, 0, i + dy, j + dx]
        torch.testing.assert_close(assembled[0, channel], expected)


def test_locality_self_attention_masks_the_diagonal_and_learns_temperature():
    model = vision_attn.create_model("va_vit_spt_lsa_tiny_patch4_32", depth=1)
    attn = model.blocks[0].attn
    attn.fused_attn = False
    probs = []
    handle = attn.attn_drop.register_forward_pre_hook(lambda m, args: probs.append(args[0]))
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    handle.remove()
    diag = probs[0].diagonal(dim1=-2, dim2=-1)
    assert probs[0].shape == (2, 3, 65, 65)
    assert torch.all(diag == 0)
    torch.testing.assert_close(probs[0].sum(-1), torch.ones(2, 3, 65))
    assert attn.log_temperature.grad is not None
    assert attn.log_temperature.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("x", "error", "pattern"),
    [
        (torch.randn(2, 1, 32, 32), ValueError, r"1 channels .* in_chans=3"),
        (torch.randn(2, 3, 30, 30), ValueError, r"30x30; the model expects img_size=32x32"),
        (
            torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8),
            TypeError,
            r"dtype torch.uint8; expected a floating",
        ),
        (torch.randn(3, 32, 32), ValueError, r"4-D \[B, C, H, W\], got 3-D"),
        ([[1.0]], TypeError, r"must be a torch.Tensor"),
    ],
    ids=["channels", "size", "dtype", "rank", "not_tensor"],
)
def test_bad_input_is_named(x, error, pattern):
    model = vision_attn.create_model("va_vit_tiny_patch4_32", depth=1)
    with pytest.raises(error, match=pattern):
        model(x)


def test_dynamic_model_still_needs_divisible_sizes():
    model = vision_attn.create_model("va_vit_tiny_patch4_32", depth=1, dynamic_img_size=True)
    assert model(torch.randn(1, 3, 36, 20)).shape == (1, 10)
    with pytest.raises(ValueError, match=r"34x20, which is not divisible by patch_size 4x4"):
        model(torch.randn(1, 3, 34, 20))


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        (dict(img_size=30), r"img_size \(30, 30\) is not divisible by patch_size \(4, 4\)"),
        (dict(global_pool="max"), r"global_pool 'max' is not one of"),
        (dict(class_token=False), r"global_pool 'token' needs class_token=True"),
        (dict(embed_dim=100), r"embed_dim 100 is not divisible by num_heads 3"),
        (dict(drop_path_rate=1.5), r"drop_path_rate must be in \[0, 1\), got 1.5"),
        (dict(pos_embed="rope"), r"pos_embed 'rope' is not one of"),
    ],
)
def test_bad_config_is_named(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        vision_attn.create_model("va_vit_tiny_patch4_32", depth=1, **kwargs)


def test_loading_weights_of_another_architecture_names_the_mismatch(tmp_path):
    other = vision_attn.create_model("va_vit_small_patch4_32", depth=1)
    save_file(other.state_dict(), str(tmp_path / "small.safetensors"))
    with pytest.raises(
        ValueError,
        match=r"does not fit VisionTransformer: shape mismatch \(\d+\): .*proj.bias: file \(384,\) vs model \(192,\)",
    ):
        vision_attn.create_model("va_vit_tiny_patch4_32", depth=1, checkpoint_path=tmp_path / "small.safetensors")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        vision_attn.create_model("va_vit_tiny_patch4_32", checkpoint_path=tmp_path / "missing.pth")
    (tmp_path / "corrupt.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PyTorch or safetensors file"):
        vision_attn.create_model("va_vit_tiny_patch4_32", checkpoint_path=tmp_path / "corrupt.pth")


def test_attention_dropout_is_applied_on_both_paths_in_training():
    torch.manual_seed(0)
    model = VisionTransformer(**SMALL, attn_drop_rate=0.5).train()
    x = torch.randn(2, 3, 32, 32)
    for fused in (True, False):
        for m in model.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = fused
        assert not torch.allclose(model(x), model(x))  # dropout masks differ between calls
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    assert F.softmax(model(x), -1).sum().item() == pytest.approx(2.0, abs=1e-5)


def test_conv_stem_embed_grid_widths_and_errors() -> None:
    from vision_attn.layers import ConvStemEmbed

    stem = ConvStemEmbed(img_size=64, patch_size=8, in_chans=1, embed_dim=40, stem_chans=(8, 16, 32))
    tokens = stem(torch.randn(2, 1, 64, 64))
    assert tokens.shape == (2, 8, 8, 40)
    assert stem.grid_size == (8, 8)
    assert stem.feat_ratio() == (8, 8)
    convs = [m for m in stem.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.stride[0]) for c in convs] == [(8, 2), (16, 2), (32, 2), (40, 1)]
    assert stem.dynamic_feat_size((48, 32)) == (6, 4)
    assert ConvStemEmbed(img_size=32, patch_size=4, embed_dim=64).grid_size == (8, 8)
    with pytest.raises(ValueError, match="power of 2"):
        ConvStemEmbed(img_size=60, patch_size=6)
    with pytest.raises(ValueError, match=r"stem_chans \[8\] must give 3 positive widths"):
        ConvStemEmbed(patch_size=8, stem_chans=(8,))
    with pytest.raises(ValueError, match="stem_depth must be an int >= 1"):
        ConvStemEmbed(patch_size=8, stem_depth=0)


def test_conv_stem_embed_two_convs_per_stage_downsample_then_look() -> None:
    from vision_attn.layers import ConvStemEmbed

    stem = ConvStemEmbed(img_size=64, patch_size=8, in_chans=1, embed_dim=40, stem_chans=(8, 16, 32), stem_depth=2)
    assert stem(torch.randn(2, 1, 64, 64)).shape == (2, 8, 8, 40)
    convs = [m for m in stem.modules() if isinstance(m, torch.nn.Conv2d)]
    layout = [(c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0]) for c in convs]
    assert layout == [(1, 8, 3, 2), (8, 8, 3, 1), (8, 16, 3, 2), (16, 16, 3, 1), (16, 32, 3, 2), (32, 32, 3, 1),
                      (32, 40, 1, 1)]  # fmt: skip


def test_default_model_pools_by_sequence_attention_over_conv_tokens() -> None:
    model = vision_attn.create_model("va_vitc2_seq_tiny_patch8_64", in_chans=1).eval()
    convs = [m for m in model.patch_embed.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.stride[0]) for c in convs] == [(16, 2), (16, 1), (32, 2), (32, 1), (64, 2), (64, 1),
                                                              (96, 1)]  # fmt: skip
    assert model.num_prefix_tokens == 0
    assert model.global_pool == "seq"
    x = torch.randn(3, 1, 64, 64)
    tokens = model.forward_features(x)
    assert tokens.shape == (3, 64, 96)  # 8x8 tokens of dim 96
    assert len(model.blocks) == 2
    weights = model.attn_pool.attention_pool(tokens).softmax(dim=1)  # B, N, 1
    torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), (weights * tokens).sum(dim=1))
