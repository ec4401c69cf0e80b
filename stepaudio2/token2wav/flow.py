"""The token2wav flow: speech codes -> 80-bin mel at 50 Hz (spec §4.2, §4.3).

`CausalMaskedDiffWithXvec` (alias `FlowModel`) = token embedding + x-vector projection + UpsampleConformerEncoderV2
+ `encoder_proj` (-> mu) + `CausalConditionalCFM` (Euler sampling of the DiT estimator with classifier-free
guidance). Attribute names are the flow.pt keys; `load_flow` loads it strictly.

Offline: `inference` / `inference_batch`.
Streaming: `setup_stream(prompt) -> FlowStreamState`, then `stream_chunk(state, codes, last)` per chunk, or
`batched_stream_step(states, chunks, lasts)` for many streams at once (one estimator call per Euler step for all
of them). Every bit of stream state lives in the FlowStreamState; the modules hold none. Stream methods never
modify a state's tensors in place (they replace them), so a state made by `setup_stream` can be cached per voice
and copied with `FlowStreamState.copy()` for every new stream.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stepaudio2.errors import CheckpointError, InvalidInputError
from stepaudio2.token2wav.config import CFMConfig, FlowConfig, load_flow_config
from stepaudio2.token2wav.conformer import UpsampleConformerEncoderV2
from stepaudio2.token2wav.dit import DiT
from stepaudio2.token2wav.noise import NOISE_SECONDS, upstream_noise_buffer

FLOW_WEIGHTS = "flow.pt"

N_TIMESTEPS = 10  # Euler steps on the cosine grid t = 1 - cos(pi/2 * linspace(0, 1, N + 1))
MEL_FRAME_RATE = 50  # frames per second of the flow's mel
# Streaming: the estimator keeps the prompt frames plus this many most recent frames (spec §4.3). Our caches are
# oldest first. Upstream's DiT cache is newest first, so its literal `[:prompt] + [-100:]` slice keeps the newest
# prompt-length frames and the prompt's last 100 instead; the count, hence the noise offset, is the same.
ESTIMATOR_CACHE_KEEP_FRAMES = 100
# Streaming: the conformer keeps the prompt tokens plus this many recent tokens (and `up_stride` times as many
# upsampled positions). Upstream never trims it; VOX keeps the last 128. Bounding it keeps long sessions at a
# fixed cost; the relative positions of the kept prompt entries then move closer to the chunk.
CONFORMER_CACHE_KEEP_TOKENS = 128


class PromptLike(Protocol):
    """What the flow needs from a voice prompt (stepaudio2.token2wav.prompt.VoicePrompt fits)."""

    tokens: Any  # (T,) int speech tokens
    xvector: Any  # (spk_embed_dim,) float speaker embedding
    mel: Any  # (2T, mel) float 24 kHz log-mel, aligned to the tokens


class FlowEngine(Protocol):
    """Where the flow's networks run when not on its torch modules (stepaudio2.token2wav.engine.GraphEngine):
    the signatures of the exported graphs (stepaudio2.token2wav.graphs), torch tensors in and out."""

    def encode(self, tokens: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def encode_chunk(
        self, tokens: torch.Tensor, token_count: torch.Tensor, *caches: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def velocity(self, *args: torch.Tensor) -> torch.Tensor: ...

    def velocity_chunk(self, *args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


# ---------------------------------------------------------------------------------------------------------------
# CFM


class RoundInterrupted(Exception):
    """A batched chunk step stopped before its next Euler step because its caller asked (`interrupt`); no stream
    state changed, so the same chunks can run again (with more streams)."""


def cosine_time_grid(n_steps: int, device: torch.device | None = None) -> torch.Tensor:
    """t_k = 1 - cos(pi/2 * k/n), k = 0..n (fp32)."""
    t = torch.linspace(0, 1, n_steps + 1, device=device, dtype=torch.float32)
    return 1 - torch.cos(t * 0.5 * math.pi)


def _euler_dts(n_steps: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(t, dt) for each Euler step; t advances by accumulation as in upstream's solver. Computed on the CPU
    so that every device uses the same grid."""
    grid = cosine_time_grid(n_steps)
    out = []
    t, dt = grid[0], grid[1] - grid[0]
    for step in range(1, n_steps + 1):
        out.append((t.to(device), dt.to(device)))
        t = t + dt
        if step < n_steps:
            dt = grid[step + 1] - t
    return out


class CausalConditionalCFM(nn.Module):
    """`decoder`: the DiT estimator plus the fixed noise buffer and the CFG sampler."""

    def __init__(self, cfg: CFMConfig, noise: torch.Tensor) -> None:
        """`noise` (1, mel, frames): the fixed x0 buffer (`upstream_noise_buffer`: upstream's draw for the
        flow's dimensions, the same in every worker)."""
        super().__init__()
        self.estimator = DiT(cfg.estimator)
        self.inference_cfg_rate = float(cfg.inference_cfg_rate)
        self.mel_bins = cfg.estimator.out_channels
        self.register_buffer("rand_noise", noise.clone(), persistent=False)
        self.engine: FlowEngine | None = None  # None: the torch estimator

    @property
    def max_frames(self) -> int:
        return self.rand_noise.shape[2]

    def velocity(self, *args: torch.Tensor) -> torch.Tensor:
        """`DiT.forward` on the selected engine."""
        return self.estimator(*args) if self.engine is None else self.engine.velocity(*args)

    def velocity_chunk(self, *args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`DiT.forward_chunk` on the selected engine."""
        return self.estimator.forward_chunk(*args) if self.engine is None else self.engine.velocity_chunk(*args)

    def guided_velocity(self, v_cond: torch.Tensor, v_uncond: torch.Tensor) -> torch.Tensor:
        r = self.inference_cfg_rate
        return (1.0 + r) * v_cond - r * v_uncond

    def forward(
        self,
        mu: torch.Tensor,
        mask: torch.Tensor,
        spks: torch.Tensor,
        cond: torch.Tensor,
        n_timesteps: int = N_TIMESTEPS,
    ) -> torch.Tensor:
        """Offline sampling. mu, cond (b, mel, T); mask (b, 1, T); spks (b, mel) -> mel (b, mel, T).

        One estimator call per step on a doubled batch: rows [0, b) conditioned, rows [b, 2b) with mu, spks and
        cond zeroed; v = (1 + cfg) v_cond - cfg v_uncond."""
        b, _, t_len = mu.shape
        x = self.rand_noise[:, :, :t_len].expand(b, -1, -1)
        mask_in = torch.cat([mask, mask])
        mu_in = torch.cat([mu, torch.zeros_like(mu)])
        spks_in = torch.cat([spks, torch.zeros_like(spks)])
        cond_in = torch.cat([cond, torch.zeros_like(cond)])
        for t, dt in _euler_dts(n_timesteps, mu.device):
            v = self.velocity(torch.cat([x, x]), mask_in, mu_in, t.expand(2 * b), spks_in, cond_in)
            x = x + dt * self.guided_velocity(v[:b], v[b:])
        return x


# ---------------------------------------------------------------------------------------------------------------
# Streaming state


@dataclass
class FlowStreamState:
    """Everything one flow stream carries between chunks (batch dimension 1 everywhere).

    Conformer: `lookahead_cache` (1, d, 2) and `up_cache` (1, d, 2*stride) conv caches; `att_cache`
    (num_blocks, 1, heads, T, 2*d_k) and `up_att_cache` (num_up_blocks, 1, heads, stride*T, 2*d_k) keys|values,
    oldest first, the first `prompt_tokens` (x stride) entries from the prompt.
    Estimator, one cache per Euler step and per CFG row (0 = conditioned, 1 = unconditioned):
    `estimator_cnn_cache` (steps, depth, 2, 2*hidden, 2) and `estimator_att_cache`
    (steps, depth, 2, heads, L, 2*head_dim), oldest first, the first `prompt_mel_len` frames from the prompt.
    `spks` (1, mel) is the projected speaker embedding.
    """

    spks: torch.Tensor
    lookahead_cache: torch.Tensor
    up_cache: torch.Tensor
    att_cache: torch.Tensor
    up_att_cache: torch.Tensor
    estimator_cnn_cache: torch.Tensor
    estimator_att_cache: torch.Tensor
    prompt_tokens: int
    prompt_mel_len: int
    frames_out: int = 0
    finished: bool = False

    @property
    def noise_offset(self) -> int:
        """Where this stream's next chunk starts in the noise buffer: the estimator cache length."""
        return int(self.estimator_att_cache.shape[4])

    def copy(self) -> FlowStreamState:
        """A new state sharing the (never modified in place) tensors: a cached voice setup for a new stream."""
        return dataclasses.replace(self)


# ---------------------------------------------------------------------------------------------------------------
# The flow


def _trim(cache: torch.Tensor, dim: int, keep_head: int, keep_tail: int) -> torch.Tensor:
    """Keep the first `keep_head` and the last `keep_tail` entries along `dim` (no-op when short enough)."""
    n = cache.shape[dim]
    if n <= keep_head + keep_tail:
        return cache
    return torch.cat([cache.narrow(dim, 0, keep_head), cache.narrow(dim, n - keep_tail, keep_tail)], dim=dim)


class CausalMaskedDiffWithXvec(nn.Module):
    def __init__(self, cfg: FlowConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.input_embedding = nn.Embedding(cfg.vocab_size, cfg.input_size)
        self.spk_embed_affine_layer = nn.Linear(cfg.spk_embed_dim, cfg.output_size)
        self.encoder = UpsampleConformerEncoderV2(cfg.encoder)
        self.encoder_proj = nn.Linear(cfg.encoder.output_size, cfg.output_size)
        self.decoder = CausalConditionalCFM(cfg.decoder, upstream_noise_buffer(cfg))
        self.engine: FlowEngine | None = None  # None: the torch modules (see set_engine)

    def set_engine(self, engine: FlowEngine | None) -> None:
        """Run the encoders (offline and streaming) and the estimator on `engine` (exported graphs) instead of
        the torch modules; None goes back to torch. The rest (speaker embedding, Euler loop, cache trimming and
        batching) is unchanged."""
        self.engine = engine
        self.decoder.engine = engine

    @property
    def pre_lookahead_len(self) -> int:
        return self.cfg.encoder.pre_lookahead_len

    @property
    def up_rate(self) -> int:
        return self.cfg.encoder.up_stride

    @property
    def mel_bins(self) -> int:
        return self.cfg.output_size

    @property
    def device(self) -> torch.device:
        return self.encoder_proj.weight.device

    # ---- inputs ---------------------------------------------------------------------------------------------

    def _codes(self, codes: Sequence[int] | np.ndarray | torch.Tensor, what: str) -> torch.Tensor:
        # np.array copies: prompts hold read-only arrays, which torch will not wrap.
        t = codes if isinstance(codes, torch.Tensor) else torch.from_numpy(np.array(codes, dtype=np.int64))
        if t.dim() != 1:
            raise InvalidInputError(f"{what} must be a 1-D sequence of speech codes, got shape {tuple(t.shape)}")
        t = t.to(torch.int64)
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.cfg.vocab_size):
            bad = int(t[(t < 0) | (t >= self.cfg.vocab_size)][0])
            raise InvalidInputError(f"{what}: speech code {bad} is outside [0, {self.cfg.vocab_size})")
        return t

    def _prompt(self, prompt: PromptLike) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (tokens (P,), mel (r*P, mel), xvector (spk_dim,)), trimmed so that mel frames == r * tokens."""
        tokens = self._codes(prompt.tokens, "voice prompt tokens")
        mel = torch.from_numpy(np.array(prompt.mel, dtype=np.float32))
        xvec = torch.from_numpy(np.array(prompt.xvector, dtype=np.float32))
        if mel.dim() != 2 or mel.shape[1] != self.mel_bins:
            raise InvalidInputError(f"voice prompt mel must be (frames, {self.mel_bins}), got {tuple(mel.shape)}")
        if xvec.shape != (self.cfg.spk_embed_dim,):
            raise InvalidInputError(
                f"voice prompt xvector must be ({self.cfg.spk_embed_dim},), got {tuple(xvec.shape)}"
            )
        if not (torch.isfinite(mel).all() and torch.isfinite(xvec).all()):
            raise InvalidInputError("voice prompt mel/xvector hold NaN or infinite values")
        n = min(tokens.numel(), mel.shape[0] // self.up_rate)
        if n < 1:
            raise InvalidInputError("voice prompt has no speech tokens (or a mel shorter than one token)")
        dev = self.device
        return tokens[:n].to(dev), mel[: n * self.up_rate].to(dev), xvec.to(dev)

    def embed_speaker(self, xvectors: torch.Tensor) -> torch.Tensor:
        """(b, spk_dim) x-vectors -> (b, mel): L2-normalise, then the affine projection."""
        return self.spk_embed_affine_layer(F.normalize(xvectors, dim=1))

    # ---- offline ----------------------------------------------------------------------------------------------

    def encode_torch(self, tokens: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (b, T) int64 padded, lengths (b,) -> mu (b, mel, r*T), mel lengths (b,) (the flow_encoder graph)."""
        valid = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0) < lengths.unsqueeze(1)
        emb = self.input_embedding(tokens) * valid.unsqueeze(-1).float()
        h, mel_lens = self.encoder(emb, lengths)
        return self.encoder_proj(h).transpose(1, 2), mel_lens

    def encode(self, tokens: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.engine is not None:
            return self.engine.encode(tokens, lengths)
        return self.encode_torch(tokens, lengths)

    @torch.no_grad()
    def inference(self, codes: Sequence[int] | np.ndarray | torch.Tensor, prompt: PromptLike) -> torch.Tensor:
        """N codes -> mel (mel_bins, up_rate * N), conditioned on the voice prompt (spec §4.2)."""
        return self.inference_batch([codes], [prompt])[0]

    @torch.no_grad()
    def inference_batch(
        self, codes_list: Sequence[Sequence[int] | np.ndarray | torch.Tensor], prompts: Sequence[PromptLike]
    ) -> list[torch.Tensor]:
        """Several requests in one batch (padded, masked): item i -> (mel_bins, up_rate * len(codes_i))."""
        if len(codes_list) != len(prompts) or not codes_list:
            raise InvalidInputError("inference_batch needs one prompt per codes sequence, and at least one")
        r = self.up_rate
        items = []
        for i, (codes, prompt) in enumerate(zip(codes_list, prompts, strict=True)):
            c = self._codes(codes, f"codes[{i}]")
            if c.numel() == 0:
                raise InvalidInputError(f"codes[{i}] is empty: nothing to synthesise")
            items.append((c, *self._prompt(prompt)))
        lengths = [p.numel() + c.numel() for c, p, _, _ in items]
        t_max = max(lengths)
        if r * t_max > self.decoder.max_frames:
            raise InvalidInputError(
                f"prompt + codes give {r * t_max} mel frames, more than the {self.decoder.max_frames} "
                f"({NOISE_SECONDS} s) the flow supports"
            )
        b, dev = len(items), self.device
        tokens = torch.zeros(b, t_max, dtype=torch.int64, device=dev)
        cond = torch.zeros(b, self.mel_bins, r * t_max, device=dev)
        for i, (c, p, mel, _) in enumerate(items):
            tokens[i, : lengths[i]] = torch.cat([p, c.to(dev)])
            cond[i, :, : mel.shape[0]] = mel.T
        lens = torch.tensor(lengths, dtype=torch.int64, device=dev)
        spks = self.embed_speaker(torch.stack([x for _, _, _, x in items]))

        mu, mel_lens = self.encode(tokens, lens)
        mask = (torch.arange(r * t_max, device=dev).unsqueeze(0) < mel_lens.unsqueeze(1)).float().unsqueeze(1)
        feat = self.decoder(mu, mask, spks, cond)
        return [feat[i, :, r * p.numel() : int(mel_lens[i])] for i, (_, p, _, _) in enumerate(items)]

    # ---- streaming --------------------------------------------------------------------------------------------

    def encode_chunk(
        self,
        tokens: torch.Tensor,
        last: bool,
        lookahead_cache: torch.Tensor | None = None,
        up_cache: torch.Tensor | None = None,
        att_cache: torch.Tensor | None = None,
        up_att_cache: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One streaming chunk through the conformer: tokens (1, t) -> (mu (1, mel, r*n), new lookahead cache,
        up cache, att cache, up att cache); n = t - pre_lookahead_len, or t when `last`. None caches: the
        stream's first chunk."""
        if self.engine is not None:
            caches = (lookahead_cache, up_cache, att_cache, up_att_cache)
            if lookahead_cache is None:
                caches = self.empty_chunk_caches(tokens.shape[0])
            count = torch.full((tokens.shape[0],), tokens.shape[1], dtype=torch.int64, device=tokens.device)
            if last:  # the graph zeroes the embeddings of these stand-ins for the missing lookahead
                tokens = F.pad(tokens, (0, self.pre_lookahead_len))
            return self.engine.encode_chunk(tokens, count, *caches)
        h, *caches = self.encoder.forward_chunk(
            self.input_embedding(tokens), last, lookahead_cache, up_cache, att_cache, up_att_cache
        )
        return self.encoder_proj(h).transpose(1, 2), *caches

    def empty_chunk_caches(self, batch: int = 1) -> tuple[torch.Tensor, ...]:
        """What None caches mean for `encode_chunk`: zero conv caches and attention caches of length 0."""
        enc, dev = self.cfg.encoder, self.device
        d, h = enc.output_size, enc.attention_heads
        width = 2 * (d // h)
        return (
            torch.zeros(batch, d, self.encoder.pre_lookahead_layer.cache_len, device=dev),
            torch.zeros(batch, d, self.encoder.up_layer.cache_len, device=dev),
            torch.zeros(enc.num_blocks, batch, h, 0, width, device=dev),
            torch.zeros(enc.num_up_blocks, batch, h, 0, width, device=dev),
        )

    @torch.no_grad()
    def setup_stream(self, prompt: PromptLike) -> FlowStreamState:
        """Run the voice prompt through the conformer and the estimator to fill a new stream's caches.

        The prompt tokens get their first `pre_lookahead_len` tokens appended as a stand-in lookahead, and the
        prompt mel is the estimator's `cond` (spec §4.3)."""
        tokens, mel, xvec = self._prompt(prompt)
        la = self.pre_lookahead_len
        lookahead = tokens.repeat(math.ceil(la / tokens.numel()))[:la]
        spks = self.embed_speaker(xvec.unsqueeze(0))
        mu, la_cache, up_cache, att, up_att = self.encode_chunk(torch.cat([tokens, lookahead]).unsqueeze(0), False)
        est = self.decoder.estimator
        steps, depth = N_TIMESTEPS, len(est.blocks)
        empty_state = FlowStreamState(
            spks=spks,
            lookahead_cache=la_cache,
            up_cache=up_cache,
            att_cache=att,
            up_att_cache=up_att,
            estimator_cnn_cache=mu.new_zeros(steps, depth, 2, est.cnn_cache_channels, est.cnn_cache_len),
            estimator_att_cache=mu.new_zeros(steps, depth, 2, est.cfg.num_heads, 0, est.att_cache_width),
            prompt_tokens=tokens.numel(),
            prompt_mel_len=mel.shape[0],
        )
        _, (cnn, att_e) = self._solve_chunks([empty_state], [mu], [mel.T.unsqueeze(0)])[0]
        return dataclasses.replace(empty_state, estimator_cnn_cache=cnn, estimator_att_cache=att_e)

    def stream_chunk(
        self, state: FlowStreamState, codes: Sequence[int] | np.ndarray | torch.Tensor, last: bool
    ) -> torch.Tensor:
        """One chunk of one stream -> mel (mel_bins, up_rate * n); n = len(codes) - pre_lookahead_len, or
        len(codes) when `last` (the missing lookahead is zeros)."""
        return self.batched_stream_step([state], [codes], [last])[0]

    @torch.no_grad()
    def batched_stream_step(
        self,
        states: Sequence[FlowStreamState],
        chunks: Sequence[Sequence[int] | np.ndarray | torch.Tensor],
        lasts: Sequence[bool],
        interrupt: Callable[[int], bool] | None = None,
    ) -> list[torch.Tensor]:
        """One chunk for each of several streams: the conformer runs per stream, the estimator once per Euler
        step for all streams together (ragged caches and chunks padded and masked). Each stream's result equals
        running it alone (see tests for the tolerance). States are updated only when the whole step succeeds.
        `interrupt(k)` is asked before Euler step k; True raises RoundInterrupted (states unchanged).

        A non-last chunk needs more than `pre_lookahead_len` codes; a last chunk may be empty (it only ends the
        stream). Returns one mel (mel_bins, frames) per stream."""
        if not (len(states) == len(chunks) == len(lasts)):
            raise InvalidInputError("batched_stream_step needs one chunk and one last flag per state")
        if len({id(s) for s in states}) != len(states):
            raise InvalidInputError("batched_stream_step got the same stream state twice")
        la = self.pre_lookahead_len
        parsed = []
        for i, (state, codes, last) in enumerate(zip(states, chunks, lasts, strict=True)):
            if state.finished:
                raise InvalidInputError(f"stream {i} already received its last chunk")
            c = self._codes(codes, f"chunk {i}")
            if not last and c.numel() <= la:
                raise InvalidInputError(
                    f"chunk {i} has {c.numel()} codes; a non-final chunk needs more than the {la} lookahead codes"
                )
            parsed.append(c)

        work = [i for i, c in enumerate(parsed) if c.numel() > 0]
        updates: dict[int, dict[str, Any]] = {}
        mus, conds = [], []
        for i in work:
            st = states[i]
            mu, la_c, up_c, att, up_att = self.encode_chunk(
                parsed[i].to(self.device).unsqueeze(0),
                bool(lasts[i]),
                st.lookahead_cache,
                st.up_cache,
                st.att_cache,
                st.up_att_cache,
            )
            keep = CONFORMER_CACHE_KEEP_TOKENS
            updates[i] = dict(
                lookahead_cache=la_c,
                up_cache=up_c,
                att_cache=_trim(att, 3, st.prompt_tokens, keep),
                up_att_cache=_trim(up_att, 3, self.up_rate * st.prompt_tokens, self.up_rate * keep),
            )
            mus.append(mu)
            conds.append(torch.zeros_like(mu))  # streaming chunks carry no mel condition

        mels: dict[int, torch.Tensor] = {}
        if work:
            solved = self._solve_chunks([states[i] for i in work], mus, conds, interrupt)
            for i, (mel, (cnn, att_e)) in zip(work, solved, strict=True):
                st = states[i]
                updates[i]["estimator_cnn_cache"] = cnn
                updates[i]["estimator_att_cache"] = _trim(att_e, 4, st.prompt_mel_len, ESTIMATOR_CACHE_KEEP_FRAMES)
                mels[i] = mel[0]

        out = []
        for i, state in enumerate(states):
            mel = mels.get(i, torch.zeros(self.mel_bins, 0, device=self.device))
            for name, value in updates.get(i, {}).items():
                setattr(state, name, value)
            state.frames_out += mel.shape[1]
            state.finished = bool(lasts[i])
            out.append(mel)
        return out

    def _solve_chunks(
        self, states: Sequence[FlowStreamState], mus: Sequence[torch.Tensor], conds: Sequence[torch.Tensor],
        interrupt: Callable[[int], bool] | None = None,
    ) -> list[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]]:
        """Euler-solve one chunk per stream with one batched estimator call per step.

        mus/conds (1, mel, C_i). Rows are interleaved per stream: 2i conditioned, 2i+1 unconditioned (mu, spks
        and cond zeroed). Returns per stream (x (1, mel, C_i), (new estimator cnn cache, new att cache)) with
        the caches untrimmed."""
        n = len(states)
        c_lens = [m.shape[2] for m in mus]
        l_lens = [s.noise_offset for s in states]
        big_c, big_l = max(c_lens), max(l_lens)
        if max(o + c for o, c in zip(l_lens, c_lens, strict=True)) > self.decoder.max_frames:
            raise InvalidInputError("stream exceeds the flow's noise buffer (voice prompt too long)")

        def pad_time(x: torch.Tensor, size: int, dim: int) -> torch.Tensor:
            extra = size - x.shape[dim]
            if extra == 0:
                return x
            shape = list(x.shape)
            shape[dim] = extra
            return torch.cat([x, x.new_zeros(shape)], dim=dim)

        noise = self.decoder.rand_noise
        x = torch.cat([pad_time(noise[:, :, o : o + c], big_c, 2) for o, c in zip(l_lens, c_lens, strict=True)])
        dev = noise.device
        zeros = torch.zeros(1, self.mel_bins, big_c, device=dev)
        mu_in = torch.cat([torch.cat([pad_time(m, big_c, 2), zeros]) for m in mus])
        cond_in = torch.cat([torch.cat([pad_time(c, big_c, 2), zeros]) for c in conds])
        spks_in = torch.cat([torch.cat([s.spks, torch.zeros_like(s.spks)]) for s in states])
        cache_lengths = torch.tensor(l_lens, dtype=torch.int64, device=dev).repeat_interleave(2)
        chunk_lengths = torch.tensor(c_lens, dtype=torch.int64, device=dev).repeat_interleave(2)
        # (steps, depth, 2n, ...): the streams' caches side by side, each padded to the longest.
        cnn_all = torch.cat([s.estimator_cnn_cache for s in states], dim=2)
        att_all = torch.cat([pad_time(s.estimator_att_cache, big_l, 4) for s in states], dim=2)

        new_cnn, new_att = [], []
        for k, (t, dt) in enumerate(_euler_dts(N_TIMESTEPS, dev)):
            if interrupt is not None and interrupt(k):
                raise RoundInterrupted(f"interrupted before Euler step {k}")
            v, cnn_k, att_k = self.decoder.velocity_chunk(
                x.repeat_interleave(2, dim=0),
                mu_in,
                t.expand(2 * n),
                spks_in,
                cond_in,
                cnn_all[k],
                att_all[k],
                cache_lengths,
                chunk_lengths,
            )
            v = v.reshape(n, 2, self.mel_bins, big_c)
            x = x + dt * self.decoder.guided_velocity(v[:, 0], v[:, 1])
            new_cnn.append(cnn_k)
            new_att.append(att_k)
        cnn_steps = torch.stack(new_cnn)  # (steps, depth, 2n, 2*hidden, 2)
        att_steps = torch.stack(new_att)  # (steps, depth, 2n, heads, L + C, 2*head_dim)

        out = []
        for i, (l_i, c_i) in enumerate(zip(l_lens, c_lens, strict=True)):
            rows = slice(2 * i, 2 * i + 2)
            cnn_i, att_i = cnn_steps[:, :, rows], att_steps[:, :, rows, :, : l_i + c_i]
            if n > 1:
                # Own copies, so that a stream's state does not keep the whole batch's tensors alive.
                cnn_i, att_i = cnn_i.clone(), att_i.clone()
            out.append((x[i : i + 1, :, :c_i].clone(), (cnn_i, att_i)))
        return out


FlowModel = CausalMaskedDiffWithXvec


def build_flow(cfg: FlowConfig) -> CausalMaskedDiffWithXvec:
    """A randomly initialised flow for `cfg` (eval mode, fp32)."""
    return CausalMaskedDiffWithXvec(cfg).eval()


def load_flow(token2wav_dir: str | Path) -> CausalMaskedDiffWithXvec:
    """Build the flow from `<dir>/flow.yaml` and load `<dir>/flow.pt` strictly (fp32, CPU, eval mode).

    A missing, unexpected or misshaped tensor raises CheckpointError naming it."""
    from stepaudio2.checkpoint import load_strict

    root = Path(token2wav_dir)
    cfg = load_flow_config(root)
    path = root / FLOW_WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad checkpoint
        raise CheckpointError(f"{path} cannot be read as a torch state dict: {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a flat state dict of tensors")
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    model = CausalMaskedDiffWithXvec(cfg)
    load_strict(model, state, str(path))
    return model.eval()
