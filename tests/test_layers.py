"""Shared layers against their reference formulas."""

import math

import numpy as np
import torch

from repro.models.layers import (dic_groups, modulate, sincos_pos_embed_2d, timestep_embedding,
                                 unpatchify)


def test_timestep_embedding_formula():
    t = torch.tensor([0, 1, 999])
    emb = timestep_embedding(t, 256)
    i = np.arange(128)
    freqs = np.exp(-math.log(10000) * i / 128)
    ref = np.concatenate([np.cos(t.numpy()[:, None] * freqs), np.sin(t.numpy()[:, None] * freqs)], axis=1)
    np.testing.assert_allclose(emb.numpy(), ref, atol=1e-4)  # float32 args, as in DiT: |t*f| < 1000


def _mae_pos_embed(dim, grid):
    # numpy reference of MAE / DiT get_2d_sincos_pos_embed
    gh, gw = np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32)
    g = np.stack(np.meshgrid(gw, gh), axis=0).reshape(2, 1, grid, grid)

    def one(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one(dim // 2, g[0]), one(dim // 2, g[1])], axis=1)


def test_sincos_pos_embed_matches_mae_reference():
    np.testing.assert_allclose(sincos_pos_embed_2d(64, 4).numpy(), _mae_pos_embed(64, 4), rtol=1e-6, atol=1e-6)


def test_dic_group_rule():
    assert [dic_groups(c) for c in (96, 192, 384, 1536, 16)] == [24, 32, 32, 32, 4]


def test_modulate_broadcasts_over_tokens_and_pixels():
    shift, scale = torch.randn(2, 3), torch.randn(2, 3)
    tokens, maps = torch.randn(2, 5, 3), torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(modulate(tokens, shift, scale), tokens * (1 + scale[:, None]) + shift[:, None])
    torch.testing.assert_close(modulate(maps, shift, scale),
                               maps * (1 + scale[:, :, None, None]) + shift[:, :, None, None])


def test_unpatchify_inverts_dit_patch_order():
    x = torch.randn(1, 3, 8, 8)
    p = 2
    tokens = x.reshape(1, 3, 4, p, 4, p).permute(0, 2, 4, 3, 5, 1).reshape(1, 16, p * p * 3)
    assert torch.equal(unpatchify(tokens, p, 3), x)
