"""UpsampleConformerEncoderV2: speech tokens (25 Hz) -> 50 Hz features for the flow (spec §4.2 step 3).

Linear embed -> ESPnet relative positions -> PreLookahead (sees `pre_lookahead_len` future tokens) -> conformer
blocks (pre-LN rel-pos MHA + SiLU FFN, no conv module) -> nearest x`up_stride` + causal conv -> embed again ->
more conformer blocks -> final LayerNorm. Attribute names mirror the `encoder.*` keys of flow.pt.

Two entry points:
- `forward`: the whole sequence, full attention masked only for padding (offline).
- `forward_chunk`: one streaming chunk through explicit caches (chunk-causal). All caches come in and go out
  as tensors; nothing about a stream is kept on the module.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from stepaudio2.token2wav.config import EncoderConfig

LAYER_NORM_EPS = 1e-12  # norm_mha / norm_ff of the conformer blocks
EMBED_NORM_EPS = 1e-5  # embed.out.1, up_embed.out.1 and after_norm (torch default)
LOOKAHEAD_CONV2_KERNEL = 3  # pre_lookahead_layer.conv2 is a causal k3 conv


def rel_position_encoding(size: int, d_model: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """ESPnet relative positional encoding for `size` positions: (1, 2*size-1, d_model).

    Row k encodes the relative distance `size-1-k` (from +(size-1) down to -(size-1)), as sin on even and cos
    on odd channels. It has no parameters, so it is computed on demand instead of being stored.
    """
    rel = torch.arange(size - 1, -size, -1, dtype=torch.float32, device=device).unsqueeze(1)
    div = torch.exp(
        torch.arange(0, d_model, 2, dtype=torch.float32, device=device) * -(math.log(10000.0) / d_model)
    )
    pe = torch.zeros(2 * size - 1, d_model, dtype=torch.float32, device=device)
    pe[:, 0::2] = torch.sin(rel * div)
    pe[:, 1::2] = torch.cos(rel * div)
    return pe.unsqueeze(0).to(dtype)


class LinearEmbed(nn.Module):
    """`embed` / `up_embed`: Linear -> LayerNorm (-> dropout), then scale by sqrt(d) for the rel-pos encoding."""

    def __init__(self, idim: int, odim: int, dropout: float) -> None:
        super().__init__()
        self.out = nn.Sequential(nn.Linear(idim, odim), nn.LayerNorm(odim, eps=EMBED_NORM_EPS), nn.Dropout(dropout))
        self.xscale = math.sqrt(odim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x) * self.xscale


class RelPositionMultiHeadedAttention(nn.Module):
    """Transformer-XL style attention with learnt biases u/v and ESPnet relative positions."""

    def __init__(self, n_head: int, n_feat: int, dropout: float, key_bias: bool) -> None:
        super().__init__()
        self.h = n_head
        self.d_k = n_feat // n_head
        self.linear_q = nn.Linear(n_feat, n_feat)
        self.linear_k = nn.Linear(n_feat, n_feat, bias=key_bias)
        self.linear_v = nn.Linear(n_feat, n_feat)
        self.linear_out = nn.Linear(n_feat, n_feat)
        self.linear_pos = nn.Linear(n_feat, n_feat, bias=False)
        self.pos_bias_u = nn.Parameter(torch.empty(n_head, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.empty(n_head, self.d_k))
        nn.init.xavier_uniform_(self.pos_bias_u)
        nn.init.xavier_uniform_(self.pos_bias_v)
        self.dropout = nn.Dropout(dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.reshape(b, t, self.h, self.d_k).transpose(1, 2)  # (b, h, t, d_k)

    @staticmethod
    def rel_shift(x: torch.Tensor, tk: int) -> torch.Tensor:
        """(b, h, tq, 2*tk-1) scores against relative positions -> (b, h, tq, tk) scores against key positions.

        Queries are the last tq of the tk key positions (a chunk after its cache), so query i sits at absolute
        position tk-tq+i, and key j is at distance (tk-tq+i) - j, which is column tq-1-i+j. A gather (rather
        than the pad-and-reshape trick) picks the same values and exports with symbolic lengths.
        """
        b, h, tq, _ = x.shape
        rows = torch.arange(tq, device=x.device).unsqueeze(1)
        cols = torch.arange(tk, device=x.device).unsqueeze(0)
        return torch.gather(x, 3, (tq - 1 - rows + cols).expand(b, h, tq, tk))

    def forward(
        self,
        x: torch.Tensor,
        pos_emb: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        cache: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (b, t, d); pos_emb (1, 2*(tc+t)-1, d); key_mask (b, tc+t) bool, True = attend;
        cache (b, h, tc, 2*d_k) keys|values of earlier positions. Returns (out, new cache (b, h, tc+t, 2*d_k))."""
        b, t, _ = x.shape
        q = self._heads(self.linear_q(x))
        k = self._heads(self.linear_k(x))
        v = self._heads(self.linear_v(x))
        if cache is not None:
            k_cache, v_cache = cache.split(self.d_k, dim=-1)
            k = torch.cat([k_cache, k], dim=2)
            v = torch.cat([v_cache, v], dim=2)
        new_cache = torch.cat([k, v], dim=-1)

        p = self.linear_pos(pos_emb).reshape(1, -1, self.h, self.d_k).transpose(1, 2)  # (1, h, 2tk-1, d_k)
        q_u = q + self.pos_bias_u.unsqueeze(1)  # bias per head, broadcast over time
        q_v = q + self.pos_bias_v.unsqueeze(1)
        ac = torch.matmul(q_u, k.transpose(-2, -1))
        bd = self.rel_shift(torch.matmul(q_v, p.transpose(-2, -1)), k.shape[2])
        scores = (ac + bd) / math.sqrt(self.d_k)
        if key_mask is not None:
            blocked = ~key_mask[:, None, None, :]
            scores = scores.masked_fill(blocked, float("-inf"))
            attn = torch.softmax(scores, dim=-1).masked_fill(blocked, 0.0)
        else:
            attn = torch.softmax(scores, dim=-1)
        out = torch.matmul(self.dropout(attn), v).transpose(1, 2).reshape(b, t, self.h * self.d_k)
        return self.linear_out(out), new_cache


class PositionwiseFeedForward(nn.Module):
    def __init__(self, d: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.w_1 = nn.Linear(d, hidden)
        self.w_2 = nn.Linear(hidden, d)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(self.dropout(F.silu(self.w_1(x))))


class ConformerBlock(nn.Module):
    """Pre-LN block: x + MHA(norm_mha(x)), then x + FFN(norm_ff(x)). No conv module, no macaron FFN."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        d = cfg.output_size
        self.self_attn = RelPositionMultiHeadedAttention(
            cfg.attention_heads, d, cfg.attention_dropout_rate, cfg.key_bias
        )
        self.feed_forward = PositionwiseFeedForward(d, cfg.linear_units, cfg.dropout_rate)
        self.norm_ff = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self.norm_mha = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(
        self,
        x: torch.Tensor,
        pos_emb: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        cache: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        att, new_cache = self.self_attn(self.norm_mha(x), pos_emb, key_mask, cache)
        x = x + self.dropout(att)
        x = x + self.dropout(self.feed_forward(self.norm_ff(x)))
        return x, new_cache


class PreLookaheadLayer(nn.Module):
    """conv1 (kernel lookahead+1, sees `lookahead` future tokens) -> leaky ReLU -> causal conv2 (k3) -> + input."""

    def __init__(self, channels: int, lookahead: int) -> None:
        super().__init__()
        self.lookahead = lookahead
        self.conv1 = nn.Conv1d(channels, channels, kernel_size=lookahead + 1)
        self.conv2 = nn.Conv1d(channels, channels, kernel_size=LOOKAHEAD_CONV2_KERNEL)

    @property
    def cache_len(self) -> int:
        return LOOKAHEAD_CONV2_KERNEL - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (b, t, c) -> (b, t, c); the sequence end is zero-padded for the lookahead."""
        y = F.pad(x.transpose(1, 2), (0, self.lookahead))
        y = F.leaky_relu(self.conv1(y))
        y = self.conv2(F.pad(y, (self.cache_len, 0)))
        return y.transpose(1, 2) + x

    def forward_chunk(self, x: torch.Tensor, cache: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (b, t, c) whose last `lookahead` rows are lookahead only -> (b, t-lookahead, c), new cache (b, c, 2)."""
        y = F.leaky_relu(self.conv1(x.transpose(1, 2)))  # (b, c, t - lookahead)
        if cache is None:
            cache = y.new_zeros(y.shape[0], y.shape[1], self.cache_len)
        y = torch.cat([cache, y], dim=2)
        # Taken from the concatenation so that a chunk shorter than the cache still leaves a full cache.
        new_cache = y[:, :, y.shape[2] - self.cache_len :]
        y = self.conv2(y).transpose(1, 2)
        return y + x[:, : x.shape[1] - self.lookahead], new_cache


class Upsample1D(nn.Module):
    """Nearest-neighbour x`stride`, then a causal conv of kernel 2*stride+1 (left pad 2*stride)."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv1d(channels, channels, kernel_size=2 * stride + 1)

    @property
    def cache_len(self) -> int:
        return 2 * self.stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (b, c, t) -> (b, c, stride*t)."""
        y = torch.repeat_interleave(x, self.stride, dim=2)  # == nearest interpolation by an integer factor
        return self.conv(F.pad(y, (self.cache_len, 0)))

    def forward_chunk(self, x: torch.Tensor, cache: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.repeat_interleave(x, self.stride, dim=2)
        if cache is None:
            cache = y.new_zeros(y.shape[0], y.shape[1], self.cache_len)
        y = torch.cat([cache, y], dim=2)
        return self.conv(y), y[:, :, y.shape[2] - self.cache_len :]


class UpsampleConformerEncoderV2(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.output_size
        self.embed = LinearEmbed(cfg.input_size, d, cfg.dropout_rate)
        self.pre_lookahead_layer = PreLookaheadLayer(d, cfg.pre_lookahead_len)
        self.encoders = nn.ModuleList([ConformerBlock(cfg) for _ in range(cfg.num_blocks)])
        self.up_layer = Upsample1D(d, cfg.up_stride)
        self.up_embed = LinearEmbed(cfg.input_size, d, cfg.dropout_rate)
        self.up_encoders = nn.ModuleList([ConformerBlock(cfg) for _ in range(cfg.num_up_blocks)])
        self.after_norm = nn.LayerNorm(d, eps=EMBED_NORM_EPS)

    def _pos(self, size: int, ref: torch.Tensor) -> torch.Tensor:
        return rel_position_encoding(size, self.cfg.output_size, ref.device, ref.dtype)

    def forward(self, xs: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """xs (b, t, input_size) token embeddings, lengths (b,) -> (b, stride*t, d), lengths * stride."""
        t = xs.shape[1]
        valid = torch.arange(t, device=xs.device).unsqueeze(0) < lengths.unsqueeze(1)  # (b, t)
        # Zero the padding after the embedding so the lookahead conv of the last real tokens sees the same
        # zeros as an unpadded run (batched offline == one request at a time).
        x = self.embed(xs) * valid.unsqueeze(-1).to(xs.dtype)
        x = self.pre_lookahead_layer(x)
        pos = self._pos(t, x)
        for layer in self.encoders:
            x, _ = layer(x, pos, valid)
        x = self.up_layer(x.transpose(1, 2)).transpose(1, 2)
        lengths = lengths * self.cfg.up_stride
        t2 = x.shape[1]
        valid2 = torch.arange(t2, device=xs.device).unsqueeze(0) < lengths.unsqueeze(1)
        x = self.up_embed(x)
        pos = self._pos(t2, x)
        for layer in self.up_encoders:
            x, _ = layer(x, pos, valid2)
        return self.after_norm(x), lengths

    def forward_chunk(
        self,
        xs: torch.Tensor,
        last: bool,
        lookahead_cache: torch.Tensor | None = None,
        up_cache: torch.Tensor | None = None,
        att_cache: torch.Tensor | None = None,
        up_att_cache: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One streaming chunk; the chunk sees all cached positions plus itself (chunk-causal).

        xs (b, t, input_size): token embeddings; unless `last`, the final `pre_lookahead_len` are lookahead only.
        lookahead_cache (b, d, 2) and up_cache (b, d, 2*stride): conv caches.
        att_cache (num_blocks, b, h, tc, 2*d_k) and up_att_cache (num_up_blocks, b, h, stride*tc, 2*d_k): keys and
        values of earlier positions, oldest first. None for the first chunk.
        Returns (h (b, stride*n, d) for the n non-lookahead tokens, new lookahead_cache, new up_cache,
        new att_cache, new up_att_cache).
        """
        x = self.embed(xs)
        if last:
            # The stream ended: the missing lookahead is zeros, as at the end of an offline sequence.
            x = F.pad(x, (0, 0, 0, self.cfg.pre_lookahead_len))
        return self.forward_chunk_embedded(x, lookahead_cache, up_cache, att_cache, up_att_cache)

    def forward_chunk_embedded(
        self,
        x: torch.Tensor,
        lookahead_cache: torch.Tensor | None = None,
        up_cache: torch.Tensor | None = None,
        att_cache: torch.Tensor | None = None,
        up_att_cache: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """`forward_chunk` after `embed`: x (b, t, d) whose last `pre_lookahead_len` rows are the lookahead
        (zeros at the end of a stream). The streaming encoder graph enters here."""
        x, new_lookahead = self.pre_lookahead_layer.forward_chunk(x, lookahead_cache)

        tc = att_cache.shape[3] if att_cache is not None else 0
        pos = self._pos(tc + x.shape[1], x)
        new_att = []
        for i, layer in enumerate(self.encoders):
            x, c = layer(x, pos, None, att_cache[i] if att_cache is not None else None)
            new_att.append(c)

        x, new_up = self.up_layer.forward_chunk(x.transpose(1, 2), up_cache)
        x = self.up_embed(x.transpose(1, 2))

        tc2 = up_att_cache.shape[3] if up_att_cache is not None else 0
        pos = self._pos(tc2 + x.shape[1], x)
        new_up_att = []
        for i, layer in enumerate(self.up_encoders):
            x, c = layer(x, pos, None, up_att_cache[i] if up_att_cache is not None else None)
            new_up_att.append(c)
        return self.after_norm(x), new_lookahead, new_up, torch.stack(new_att), torch.stack(new_up_att)
