"""DiT velocity estimator of the flow (spec §4.2 step 6), `decoder.estimator.*` in flow.pt.

Input [x, mu, spk, cond] (4 x mel channels) -> in_proj -> `depth` adaLN blocks (attention with LayerNorm on q
and k, causal conv block, GELU-tanh MLP) -> adaLN final layer -> velocity (mel channels).

Both entry points are pure functions of tensors, written for ONNX export with a dynamic batch: explicit
reshapes, `F.scaled_dot_product_attention`, masks built from lengths with `arange` comparisons, and no Python
branch on tensor values.
- `forward(x, mask, mu, t, spks, cond)`: offline, whole sequence, key-padding mask.
- `forward_chunk(x, mu, t, spks, cond, cnn_cache, att_cache, cache_lengths, chunk_lengths)`: one streaming
  chunk per batch row; rows may come from different streams with different cache and chunk lengths.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from stepaudio2.token2wav.config import DiTConfig

NORM_EPS = 1e-6  # norm1/2/3 and final norm: no affine parameters
TIMESTEP_FREQ_DIM = 256  # width of the sinusoidal timestep features (t_embedder.mlp.0 input)
TIMESTEP_SCALE = 1000.0  # t in [0, 1] is scaled before the sinusoid
TIMESTEP_MAX_PERIOD = 10000.0
CONV_KERNEL = 3  # causal convs of the conv block
N_MODULATIONS = 9  # (shift, scale, gate) for attention, MLP and conv


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(TIMESTEP_FREQ_DIM, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t (b,) -> (b, hidden); sinusoid on t*1000 with the cos half first."""
        half = TIMESTEP_FREQ_DIM // 2
        freqs = torch.exp(
            -math.log(TIMESTEP_MAX_PERIOD) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        ).to(t.dtype)
        args = (t * TIMESTEP_SCALE).unsqueeze(1) * freqs.unsqueeze(0)
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        inner = num_heads * head_dim
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.q_norm = nn.LayerNorm(head_dim)
        self.k_norm = nn.LayerNorm(head_dim)
        self.proj = nn.Linear(inner, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.reshape(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (b, h, t, hd)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q = self.q_norm(self._heads(self.to_q(x)))
        k = self.k_norm(self._heads(self.to_k(x)))
        return q, k, self._heads(self.to_v(x))

    def _out(self, o: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = o.shape
        return self.proj(o.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """x (b, t, dim); key_mask (b, t) bool, True = attend."""
        q, k, v = self._qkv(x)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
        return self._out(o)

    def forward_chunk(
        self, x: torch.Tensor, att_cache: torch.Tensor, key_mask: torch.Tensor, key_index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (b, c, dim); att_cache (b, h, l, 2*hd), keys|values oldest first, padded at the end.

        key_index (b, l+c) picks, from [padded cache, padded chunk], each row's valid cache then its valid
        chunk, padding last; key_mask (b, l+c) marks those valid entries. Returns (out, new cache (b, h, l+c,
        2*hd) in that packed order)."""
        q, k, v = self._qkv(x)
        kv = torch.cat([att_cache, torch.cat([k, v], dim=-1)], dim=2)
        # Packing the valid keys first (instead of masking a gap between cache and chunk) keeps the attention
        # reduction order, hence the result, identical to an unpadded call.
        kv = torch.gather(kv, 2, key_index[:, None, :, None].expand(-1, kv.shape[1], -1, kv.shape[3]))
        k, v = kv.split(self.head_dim, dim=-1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
        return self._out(o), kv


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CausalConvBlock(nn.Module):
    """causal conv k3 -> LayerNorm -> Mish -> causal conv k3, on (b, t, c).

    `block` keeps the slot layout of the checkpoint (convs at 1 and 6, LayerNorm at 3); the other slots held
    transposes and the activation, which have no parameters, so they are Identity placeholders here and the
    forward pass calls the layers explicitly.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.block = nn.Sequential(
            nn.Identity(),
            nn.Conv1d(channels, channels, CONV_KERNEL),
            nn.Identity(),
            nn.LayerNorm(channels),
            nn.Identity(),
            nn.Identity(),
            nn.Conv1d(channels, channels, CONV_KERNEL),
            nn.Identity(),
        )

    @property
    def cache_len(self) -> int:
        return CONV_KERNEL - 1

    def _middle(self, y: torch.Tensor) -> torch.Tensor:
        return F.mish(self.block[3](y.transpose(1, 2))).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block[1](F.pad(x.transpose(1, 2), (self.cache_len, 0)))
        y = self.block[6](F.pad(self._middle(y), (self.cache_len, 0)))
        return y.transpose(1, 2)

    def forward_chunk(
        self, x: torch.Tensor, cnn_cache: torch.Tensor, cache_index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (b, c, ch); cnn_cache (b, 2*ch, 2): the conv inputs of the last 2 frames (conv1 | conv2).

        cache_index (b, 2): positions, within [cache, chunk], of each row's last two valid frames; rows whose
        chunk is padded take their new cache from before the padding."""
        c1, c2 = cnn_cache.split(self.channels, dim=1)
        idx = cache_index.unsqueeze(1).expand(-1, self.channels, -1)
        y = torch.cat([c1, x.transpose(1, 2)], dim=2)
        new1 = torch.gather(y, 2, idx)
        y = self._middle(self.block[1](y))
        y = torch.cat([c2, y], dim=2)
        new2 = torch.gather(y, 2, idx)
        y = self.block[6](y)
        return y.transpose(1, 2), torch.cat([new1, new2], dim=1)


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.norm1 = nn.LayerNorm(d, eps=NORM_EPS, elementwise_affine=False)
        self.attn = Attention(d, cfg.num_heads, cfg.head_dim)
        self.norm2 = nn.LayerNorm(d, eps=NORM_EPS, elementwise_affine=False)
        self.mlp = Mlp(d, int(d * cfg.mlp_ratio))
        self.norm3 = nn.LayerNorm(d, eps=NORM_EPS, elementwise_affine=False)
        self.conv = CausalConvBlock(d)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, N_MODULATIONS * d))

    def _mods(self, c: torch.Tensor) -> list[torch.Tensor]:
        return list(self.adaLN_modulation(c).chunk(N_MODULATIONS, dim=-1))

    def forward(self, x: torch.Tensor, c: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        sh_a, sc_a, g_a, sh_m, sc_m, g_m, sh_c, sc_c, g_c = self._mods(c)
        x = x + g_a * self.attn(modulate(self.norm1(x), sh_a, sc_a), key_mask)
        x = x + g_c * self.conv(modulate(self.norm3(x), sh_c, sc_c))
        return x + g_m * self.mlp(modulate(self.norm2(x), sh_m, sc_m))

    def forward_chunk(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        cnn_cache: torch.Tensor,
        att_cache: torch.Tensor,
        key_mask: torch.Tensor,
        key_index: torch.Tensor,
        cache_index: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sh_a, sc_a, g_a, sh_m, sc_m, g_m, sh_c, sc_c, g_c = self._mods(c)
        a, new_att = self.attn.forward_chunk(modulate(self.norm1(x), sh_a, sc_a), att_cache, key_mask, key_index)
        x = x + g_a * a
        v, new_cnn = self.conv.forward_chunk(modulate(self.norm3(x), sh_c, sc_c), cnn_cache, cache_index)
        x = x + g_c * v
        x = x + g_m * self.mlp(modulate(self.norm2(x), sh_m, sc_m))
        return x, new_cnn, new_att


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, out_channels: int) -> None:
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.norm_final = nn.LayerNorm(hidden, eps=NORM_EPS, elementwise_affine=False)
        self.linear = nn.Linear(hidden, out_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.t_embedder = TimestepEmbedder(cfg.hidden_size)
        self.in_proj = nn.Linear(cfg.in_channels, cfg.hidden_size)
        self.blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(cfg.hidden_size, cfg.out_channels)

    @property
    def cnn_cache_channels(self) -> int:
        return 2 * self.cfg.hidden_size  # conv1 | conv2 inputs

    @property
    def cnn_cache_len(self) -> int:
        return CONV_KERNEL - 1

    @property
    def att_cache_width(self) -> int:
        return 2 * self.cfg.head_dim  # keys | values

    def _inputs(
        self, x: torch.Tensor, mu: torch.Tensor, t: torch.Tensor, spks: torch.Tensor, cond: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (hidden (b, t, hidden), timestep conditioning (b, 1, hidden))."""
        spk = spks.unsqueeze(-1).expand(-1, -1, x.shape[2])
        h = torch.cat([x, mu, spk, cond], dim=1).transpose(1, 2)
        return self.in_proj(h), self.t_embedder(t).unsqueeze(1)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        mu: torch.Tensor,
        t: torch.Tensor,
        spks: torch.Tensor,
        cond: torch.Tensor,
    ) -> torch.Tensor:
        """Offline velocity.

        x, mu, cond (b, mel, T); mask (b, 1, T), nonzero = valid frame; t (b,); spks (b, mel) -> (b, mel, T).
        """
        h, c = self._inputs(x, mu, t, spks, cond)
        key_mask = mask[:, 0, :] > 0
        for block in self.blocks:
            h = block(h, c, key_mask)
        return self.final_layer(h, c).transpose(1, 2)

    def forward_chunk(
        self,
        x: torch.Tensor,
        mu: torch.Tensor,
        t: torch.Tensor,
        spks: torch.Tensor,
        cond: torch.Tensor,
        cnn_cache: torch.Tensor,
        att_cache: torch.Tensor,
        cache_lengths: torch.Tensor,
        chunk_lengths: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Streaming velocity for a batch of chunks (each row may be a different stream).

        x, mu, cond (b, mel, C): the chunk, padded at the end to C; t (b,); spks (b, mel).
        cnn_cache (depth, b, 2*hidden, 2); att_cache (depth, b, heads, L, 2*head_dim), oldest first, padded at the
        end to L. cache_lengths (b,) and chunk_lengths (b,) int64: the valid lengths (chunks need >= 1 frame).
        Each valid frame attends to its row's valid cache and to its whole valid chunk.

        Returns (velocity (b, mel, C), new cnn_cache (depth, b, 2*hidden, 2), new att_cache
        (depth, b, heads, L+C, 2*head_dim): row r holds its old cache then its chunk, oldest first, valid for
        the first cache_lengths[r] + chunk_lengths[r] entries and padded after).
        """
        h, c = self._inputs(x, mu, t, spks, cond)
        big_l = att_cache.shape[3]
        total = big_l + x.shape[2]
        pos = torch.arange(total, device=x.device).unsqueeze(0)  # (1, L + C)
        lc = cache_lengths.unsqueeze(1)
        # Packed key order per row: valid cache [0, l), valid chunk [l, l + c), then padding.
        key_index = torch.where(pos < lc, pos, pos - lc + big_l).clamp(max=total - 1)
        key_mask = pos < lc + chunk_lengths.unsqueeze(1)
        # The conv caches are the inputs of the two frames before the end of each valid chunk.
        cache_index = chunk_lengths.unsqueeze(1) + torch.arange(self.cnn_cache_len, device=x.device).unsqueeze(0)
        new_cnn, new_att = [], []
        for i, block in enumerate(self.blocks):
            h, cc, ac = block.forward_chunk(h, c, cnn_cache[i], att_cache[i], key_mask, key_index, cache_index)
            new_cnn.append(cc)
            new_att.append(ac)
        v = self.final_layer(h, c).transpose(1, 2)
        return v, torch.stack(new_cnn), torch.stack(new_att)


class EstimatorChunk(nn.Module):
    """`DiT.forward_chunk` as a module's forward, the graph that is exported for streaming."""

    def __init__(self, estimator: DiT) -> None:
        super().__init__()
        self.estimator = estimator

    def forward(
        self,
        x: torch.Tensor,
        mu: torch.Tensor,
        t: torch.Tensor,
        spks: torch.Tensor,
        cond: torch.Tensor,
        cnn_cache: torch.Tensor,
        att_cache: torch.Tensor,
        cache_lengths: torch.Tensor,
        chunk_lengths: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.estimator.forward_chunk(
            x, mu, t, spks, cond, cnn_cache, att_cache, cache_lengths, chunk_lengths
        )
