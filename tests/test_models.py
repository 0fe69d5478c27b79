"""Every preset and every switch value builds, runs forward and backward, and does what the spec says."""

import pytest
import torch
import torch.nn as nn
from conftest import randomize_, tiny

from repro import models
from repro.models import dic, dico
from repro.models.dic import DiCBlock
from repro.models.dico import ChannelAttention, ConvModule, DiCoBlock, MapAttention


def _forward_backward(model, in_channels=4, size=16, n=2):
    x = torch.randn(n, in_channels, size, size)
    t = torch.randint(0, 1000, (n,))
    y = torch.randint(0, 1000, (n,))
    model.train()
    out = model(x, t, y)
    assert out.shape == (n, 2 * in_channels, size, size)
    assert torch.isfinite(out).all()
    loss = (out - torch.randn_like(out)).square().mean()
    loss.backward()
    missing = [k for k, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    return out


@pytest.mark.parametrize("name", list(models.PRESETS))
def test_tiny_preset_forward_backward(name):
    _forward_backward(tiny(name))


@pytest.mark.parametrize("family_preset", ["DiT-S/2", "DiC-S", "DiCo-S", "U-ViT-H/2", "DiCo-S-iso", "DiG-S/2"])
def test_pixel_space_one_channel_and_64_latents(family_preset):
    # Fashion-MNIST runs: 1 channel at 32x32 in pixel space; 512 px: 64x64 latents.
    _forward_backward(tiny(family_preset, in_channels=1, input_size=32), in_channels=1, size=32)
    _forward_backward(tiny(family_preset, input_size=64), in_channels=4, size=64, n=1)


SWITCH_VALUES = {
    "DiC-XL": [dict(arch="isotropic", depths=(3,), skip_stride=3), dict(arch="isotropic_skip", depths=(4,)),
               dict(skip_stride=1), dict(skip_stride=2), dict(cond_embed="shared"),
               dict(cond_embed="shared", shared_embed_width=24), dict(inject="block_start"), dict(gate=False),
               dict(act="silu"), dict(block_zero_init=True)],
    "DiCo-S": [dict(arch="isotropic", depths=(3,), width=32), dict(arch="isotropic_skip", depths=(10,), width=32),
               dict(channel_attention="none"), dict(channel_attention="se"), dict(dw_kernel=5), dict(dw_kernel=7),
               dict(act="relu"), dict(mixer="attention"), dict(mlp_ratio=4), dict(channel_attention="channel_sa"),
               dict(mixer="window_attention"), dict(mixer="window_attention", window_size=4),
               dict(mixer="focused_linear"), dict(mixer="agent"), dict(mixer="agent", agent_num=4),
               dict(arch="isotropic", depths=(2,), width=32, mixer="window_attention", window_size=4)],
    "DiT-S/2": [dict(long_skips=1), dict(long_skips=2), dict(patch_size=4), dict(patch_size=8)],
}


@pytest.mark.parametrize("name,switch", [(n, s) for n, ss in SWITCH_VALUES.items() for s in ss],
                         ids=lambda v: v if isinstance(v, str) else ",".join(f"{k}={x}" for k, x in v.items()))
def test_every_switch_value_forward_backward(name, switch):
    _forward_backward(tiny(name, **switch))


# ------------------------------------------------------------------------------------------- DiC switches
def _dic_blocks(model):
    return [m for m in model.modules() if isinstance(m, DiCBlock)]


def test_dic_gate_false_has_no_gate_parameters():
    gated_model, plain = tiny("DiC-XL", gate=True), tiny("DiC-XL", gate=False)
    for b in _dic_blocks(gated_model):
        assert b.cond[-1].out_features == 3 * b.conv0.out_channels
    for b in _dic_blocks(plain):
        assert b.cond[-1].out_features == 2 * b.conv0.out_channels
    # exactly one C-wide chunk (weights + bias) per block disappears
    removed = sum(b.conv0.out_channels * (b.cond[-1].in_features + 1) for b in _dic_blocks(plain))
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(gated_model) - n(plain) == removed


def _decoder_input_channels(model):
    """Channels each decoder block receives in a real forward pass (records the concatenations)."""
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, args: seen.append((m.conv0.out_channels, args[0].shape[1])))
             for stage in model.dec for b in stage]
    model.eval()
    with torch.no_grad():
        model(torch.randn(1, 4, 16, 16), torch.tensor([3]), torch.tensor([1]))
    for h in hooks:
        h.remove()
    return seen


def test_dic_skip_stride_one_concatenates_at_every_decoder_block():
    dense = _decoder_input_channels(tiny("DiC-XL", skip_stride=1))
    assert all(cin == 2 * cout for cout, cin in dense)
    sparse = _decoder_input_channels(tiny("DiC-XL", skip_stride=3))
    # decoder stages run level 2 then level 1, 4 blocks each: blocks 0 and 3 consume (j % 3 == 0)
    assert [cin == 2 * cout for cout, cin in sparse] == [True, False, False, True] * 2


def test_dic_skip_layout_of_released_xl():
    with torch.device("meta"):
        m = models.build("DiC-XL")
    consuming = [[b.conv0.in_channels != b.conv0.out_channels for b in stage] for stage in m.dec]
    assert consuming == [[j % 3 == 0 for j in range(7)]] * 2
    assert m.dec[1][0].conv0.in_channels == 1536  # 768 + 768 skip, as in [C]


def test_dic_cond_embed_shared_has_one_embedder():
    shared, stage = tiny("DiC-XL", cond_embed="shared"), tiny("DiC-XL", cond_embed="stage")
    assert len(shared.t_embedders) == len(shared.y_embedders) == 1
    assert {b.cond[-1].in_features for b in _dic_blocks(shared)} == {2 * 16}  # shared at 2C (assumption)
    assert len(stage.t_embedders) == len(stage.y_embedders) == 3
    assert [e.embedding_table.embedding_dim for e in stage.y_embedders] == [16, 32, 64]


def _conv0_input_depends_on_condition(inject):
    block = DiCBlock(8, 8, 8, inject=inject, gate=True, act="gelu")
    randomize_(block)
    seen = []
    block.conv0.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    x = torch.randn(1, 8, 4, 4)
    block(x, torch.randn(1, 8))
    block(x, torch.randn(1, 8))
    return not torch.equal(seen[0], seen[1])


def test_dic_inject_position():
    assert _conv0_input_depends_on_condition("block_start")
    assert not _conv0_input_depends_on_condition("mid")
    assert DiCBlock(8, 16, 8, "block_start", False, "silu").cond[-1].out_features == 2 * 8   # k * C_in
    assert DiCBlock(8, 16, 8, "mid", False, "silu").cond[-1].out_features == 2 * 16          # k * C_out


def test_dic_act_switch_changes_in_block_activation_only():
    for act, cls in (("gelu", nn.GELU), ("silu", nn.SiLU)):
        m = tiny("DiC-XL", act=act)
        assert all(isinstance(b.act, cls) for b in _dic_blocks(m))
        assert all(isinstance(b.cond[0], nn.SiLU) for b in _dic_blocks(m))
        assert isinstance(m.final_layer.adaLN_modulation[0], nn.SiLU)


def test_dic_isotropic_archs():
    iso = tiny("DiC-XL", arch="isotropic", depths=(3,))
    assert not hasattr(iso, "down") and len(iso.skip_fuse) == 0 and len(iso.t_embedders) == 1
    skip = tiny("DiC-XL", arch="isotropic_skip", depths=(4,))
    assert len(skip.skip_fuse) == 2
    # roadmap step 2 at XL: 20 in/out pairs
    with torch.device("meta"):
        assert len(models.build("DiC-XL-step2").skip_fuse) == 20


def test_dic_roadmap_is_cumulative():
    steps = [models.PRESETS[f"DiC-XL-step{i}"] for i in range(1, 9)]
    changes = [{k for k in set(a) | set(b) if a.get(k) != b.get(k)} for a, b in zip(steps, steps[1:], strict=False)]
    assert changes == [{"arch", "depths"}, {"arch", "depths", "skip_stride"}, {"depths", "skip_stride"},
                       {"cond_embed"}, {"inject"}, {"gate"}, {"act"}]
    assert models.PRESETS["DiC-XL-step8"] == {**models.PRESETS["DiC-XL"]}
    assert [label for label, _ in dic.ROADMAP][-1] == "+ GELU (DiC-XL)"


# ------------------------------------------------------------------------------------------ DiCo switches
def test_dico_channel_attention_switch():
    cca = tiny("DiCo-S")
    assert all(isinstance(m.ca, ChannelAttention) and isinstance(m.ca.fc, nn.Conv2d)
               for m in cca.modules() if isinstance(m, ConvModule))
    none = tiny("DiCo-S", channel_attention="none")
    assert not any(isinstance(m, ChannelAttention) for m in none.modules())
    se = tiny("DiCo-S", channel_attention="se", se_reduction=4)
    for m in se.modules():
        if isinstance(m, ChannelAttention):
            convs = [c for c in m.fc if isinstance(c, nn.Conv2d)]
            assert len(convs) == 2 and convs[0].out_channels == convs[0].in_channels // 4
            assert any(isinstance(c, nn.ReLU) for c in m.fc)


def test_dico_dw_kernel_act_and_mixer():
    for k in (3, 5, 7):
        for m in tiny("DiCo-S", dw_kernel=k).modules():
            if isinstance(m, ConvModule):
                assert m.dw.kernel_size == (k, k) and m.dw.groups == m.dw.in_channels
    relu = tiny("DiCo-S", act="relu")
    assert not any(isinstance(m, nn.GELU) for m in relu.modules())
    attn = tiny("DiCo-S", mixer="attention")
    assert not any(isinstance(m, ConvModule) for m in attn.modules())
    assert any(isinstance(m, MapAttention) for m in attn.modules())


def test_dico_unet_widths_and_conditioning():
    with torch.device("meta"):
        m = models.build("DiCo-S")
    assert m.fuse1.in_channels == m.fuse1.out_channels == 256  # level-1 fusion keeps 2D channels ([C])
    assert {b.norm1.norm.normalized_shape[0] for b in m.dec1} == {256}
    assert [e.embedding_table.num_embeddings for e in m.y_embedders] == [1001] * 3


def test_dico_isotropic_skips():
    m = tiny("DiCo-S-isoskip")
    assert len(m.skip_fuse) == 2
    with torch.device("meta"):
        assert len(models.build("DiCo-S-isoskip").skip_fuse) == dico.PAPER_ISO_SKIPS


# --------------------------------------------------------------------------------------------- init
@pytest.mark.parametrize("name", ["DiT-XL/2", "DiT-S/2-skip", "DiC-XL", "DiC-XL-step1", "DiC-XL-step2", "DiCo-XL",
                                  "DiCo-S-iso", "DiCo-S-attn", "DiCo-S-channelSA", "DiCo-S-window",
                                  "DiCo-S-focused", "DiCo-S-agent"])
def test_output_exactly_zero_at_init(name):
    model = tiny(name).eval()
    out = model(torch.randn(2, 4, 16, 16), torch.tensor([10, 900]), torch.tensor([3, 7]))
    assert torch.count_nonzero(out) == 0


def test_dic_block_condition_is_not_zeroed_by_default():
    # [C]'s zero-init of the block condition Linears silently fails; we reproduce that by default.
    default = tiny("DiC-XL")
    assert all(b.cond[-1].weight.abs().sum() > 0 for b in _dic_blocks(default))
    zeroed = tiny("DiC-XL", block_zero_init=True)
    assert all(torch.count_nonzero(p) == 0 for b in _dic_blocks(zeroed) for p in b.cond[-1].parameters())


def test_dico_blocks_start_as_identity():
    block = [m for m in tiny("DiCo-S").modules() if isinstance(m, DiCoBlock)][0]
    x = torch.randn(2, 16, 8, 8)
    assert torch.equal(block(x, torch.randn(2, 16)), x)


# ---------------------------------------------------------------------------------------------- CFG
CFG_MODELS = ["DiT-S/2", "DiC-S", "DiCo-S", "U-ViT-H/2",
              # the comparison systems, one preset per family
              "PixArt-α-XL/2", "DiffiT-XL/2", "DiT-LLaMA-XL/2", "DiG-S/2", "DiS-S/2", "DiM-H", "DiffuSSM-XL",
              "DiMSUM-L/2",
              # DiCo Table 5's attention mixers
              "DiCo-S-channelSA", "DiCo-S-attn", "DiCo-S-window", "DiCo-S-focused", "DiCo-S-agent"]


def _cfg_case(name, in_channels=4):
    model = randomize_(tiny(name, in_channels=in_channels)).eval()
    x = torch.randn(3, in_channels, 16, 16)
    t = torch.tensor([5, 500, 999])
    y = torch.tensor([1, 2, 3])
    with torch.no_grad():
        cond = model(x, t, y)
        uncond = model(x, t, torch.full_like(y, model.num_classes))
    return model, x, t, y, cond, uncond


@pytest.mark.parametrize("name", CFG_MODELS)
def test_cfg_legacy_three_channels(name):
    model, x, t, y, cond, uncond = _cfg_case(name)
    assert not torch.allclose(cond, uncond)
    with torch.no_grad():
        out = model.forward_with_cfg(x, t, y, 4.0, guide_channels=3)
    assert out.shape == cond.shape
    torch.testing.assert_close(out[:, 3:], cond[:, 3:], rtol=1e-5, atol=1e-5)   # eps ch 3 and variances
    torch.testing.assert_close(out[:, :3], uncond[:, :3] + 4.0 * (cond[:, :3] - uncond[:, :3]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", CFG_MODELS)
def test_cfg_all_channels_and_scale_one(name):
    model, x, t, y, cond, uncond = _cfg_case(name)
    with torch.no_grad():
        out = model.forward_with_cfg(x, t, y, 2.0, guide_channels="all")
        plain = model.forward_with_cfg(x, t, y, 1.0)
    torch.testing.assert_close(out[:, :4], uncond[:, :4] + 2.0 * (cond[:, :4] - uncond[:, :4]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[:, 4:], cond[:, 4:], rtol=1e-5, atol=1e-5)
    assert torch.equal(plain, cond)  # scale 1 is the plain conditional forward (no batch doubling)


def test_cfg_rejects_bad_arguments():
    model, x, t, y, *_ = _cfg_case("DiC-S", in_channels=1)
    with pytest.raises(ValueError, match="guide_channels"):
        model.forward_with_cfg(x, t, y, 1.5, guide_channels=3)   # 1-channel model has one eps channel
    with pytest.raises(ValueError, match="guide_channels"):
        model.forward_with_cfg(x, t, y, 1.5, guide_channels=True)
    with pytest.raises(ValueError, match="cfg_scale"):
        model.forward_with_cfg(x, t, y, 0.5)
    model.forward_with_cfg(x, t, y, 1.5, guide_channels="all")


def test_models_never_drop_labels_themselves():
    # Label dropout belongs to the trainer (world-size invariant draws); the model only holds the null row.
    model = tiny("DiC-XL", class_dropout_prob=1.0).train()
    seen = []
    for emb in model.y_embedders:
        emb.register_forward_hook(lambda m, args, out: seen.append(args[0].clone()))
    y = torch.tensor([4, 5])
    model(torch.randn(2, 4, 16, 16), torch.tensor([1, 2]), y)
    assert len(seen) == 3 and all(torch.equal(s, y) for s in seen)
    assert [e.embedding_table.num_embeddings for e in model.y_embedders] == [1001] * 3
    assert tiny("DiT-S/2", class_dropout_prob=0.0).y_embedder.embedding_table.num_embeddings == 1000


# ----------------------------------------------------------------------------------------- registry
def test_registry_errors_name_the_valid_choices():
    with pytest.raises(ValueError, match="unknown model 'DiC-XXL'.*did you mean.*DiC-XL"):
        models.build("DiC-XXL")
    with pytest.raises(ValueError, match="unknown switch 'activation'.*did you mean act"):
        models.build("DiC-XL", activation="silu")
    with pytest.raises(ValueError, match="act='relu'.*'silu', 'gelu'"):
        models.build("DiC-XL", act="relu")
    with pytest.raises(ValueError, match="channel_attention='eca'.*'cca', 'none', 'se'"):
        models.build("DiCo-S", channel_attention="eca")
    with pytest.raises(ValueError, match="dw_kernel=9"):
        models.build("DiCo-S", dw_kernel=9)
    with pytest.raises(ValueError, match="arch='unet'"):
        models.build("DiC-S", arch="unet")
    with pytest.raises(ValueError, match="skip_stride applies to arch='hourglass' only"):
        models.build("DiC-XL-step1", skip_stride=1)
    with pytest.raises(ValueError, match="enc1 == dec1"):
        models.build("DiC-S", depths=(6, 6, 5, 6, 5))


def test_overrides_are_never_swallowed_and_presets_never_mutated():
    before = {k: dict(v) for k, v in models.PRESETS.items()}
    with torch.device("meta"):
        m = models.build("DiC-XL", act="silu", width=192)
    assert all(isinstance(b.act, nn.SiLU) for b in _dic_blocks(m))
    assert m.stem.out_channels == 192
    assert models.PRESETS == before


@pytest.mark.parametrize("name", ["DiT-S/2", "DiC-S", "DiCo-S", "DiCo-S-attn", "U-ViT-H/2"])
def test_bf16_weights_forward(name):
    # `repro bench --dtype bf16` casts the whole model; the fp32 timestep sinusoid must follow it.
    model = tiny(name).to(torch.bfloat16).eval()
    x = torch.randn(2, 4, 16, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        out = model(x, torch.tensor([1, 999]), torch.tensor([0, 5]))
    assert out.dtype == torch.bfloat16 and out.shape == (2, 8, 16, 16)
