"""HiFT vocoder: 80-bin mel at 50 Hz -> 24 kHz waveform (spec §4.4), and strict loading of `hift.pt`.

HiFTNet = neural source filter + iSTFTNet. An F0 predictor turns the mel into a pitch track; the NSF source
module turns the pitch into a harmonic excitation (8 harmonics + the fundamental, plus noise); the generator
upsamples the mel (x8, x5, x3), fuses the STFT of the excitation at every scale, and predicts a 16-point STFT
(magnitude and phase) that an inverse STFT with hop 4 turns into samples: 8 * 5 * 3 * 4 = 480 samples per
mel frame.

Randomness: the excitation has a random initial phase per harmonic and additive Gaussian noise. Both are drawn
from the `torch.Generator` passed to `inference`, so a per-stream generator gives reproducible audio that does
not depend on what other streams do.

Dimensions: there is no hift.yaml upstream (the generator is built with its defaults), so `load_hift` reads the
channel counts that vary between our presets (base channels, F0-predictor channels, mel bins, harmonics) from
the tensor shapes in the file and keeps everything else at the upstream defaults; any tensor that then does not
fit is reported by name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from stepaudio2.errors import CheckpointError, InvalidInputError

CHECKPOINT_PREFIX = "generator."
# Weight-norm tensor names: torch's parametrization API (what the module uses) and the older hook API.
_WN_G = "parametrizations.weight.original0"
_WN_V = "parametrizations.weight.original1"
_LEGACY_WN = {"weight_g": _WN_G, "weight_v": _WN_V}
_MAX_NAMES = 12  # tensor names listed per problem kind in an error message


@dataclass(frozen=True)
class HiFTConfig:
    """Hyper-parameters of the generator. Defaults are the released model's (upstream constructor defaults)."""

    in_channels: int = 80
    base_channels: int = 512
    f0_channels: int = 512
    nb_harmonics: int = 8
    sampling_rate: int = 24000
    nsf_alpha: float = 0.1  # sine amplitude
    nsf_sigma: float = 0.003  # noise std in voiced regions
    nsf_voiced_threshold: float = 10.0  # Hz
    upsample_rates: tuple[int, ...] = (8, 5, 3)
    upsample_kernel_sizes: tuple[int, ...] = (16, 11, 7)
    istft_n_fft: int = 16
    istft_hop: int = 4
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilations: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    source_resblock_kernel_sizes: tuple[int, ...] = (7, 7, 11)
    source_resblock_dilations: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    lrelu_slope: float = 0.1
    audio_limit: float = 0.99

    @property
    def hop_length(self) -> int:
        """Output samples per mel frame."""
        return math.prod(self.upsample_rates) * self.istft_hop

    def validate(self) -> None:
        n_up = len(self.upsample_rates)
        problems = []
        if len(self.upsample_kernel_sizes) != n_up:
            problems.append("upsample_kernel_sizes must have one entry per upsample rate")
        if len(self.source_resblock_kernel_sizes) != n_up or len(self.source_resblock_dilations) != n_up:
            problems.append("source resblocks need one kernel size and dilation list per upsample rate")
        if len(self.resblock_kernel_sizes) != len(self.resblock_dilations):
            problems.append("resblock_kernel_sizes and resblock_dilations differ in length")
        if self.base_channels % (2**n_up):
            problems.append(f"base_channels {self.base_channels} is not divisible by 2**{n_up}")
        for name in ("in_channels", "base_channels", "f0_channels", "istft_n_fft", "istft_hop"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be positive")
        if self.nb_harmonics < 0:
            problems.append("nb_harmonics must be >= 0")
        if problems:
            raise CheckpointError("HiFT config: " + "; ".join(problems))


def _wn_conv(*args: Any, **kwargs: Any) -> nn.Conv1d:
    return weight_norm(nn.Conv1d(*args, **kwargs))


def _same_padding(kernel: int, dilation: int = 1) -> int:
    return (kernel * dilation - dilation) // 2


class Snake(nn.Module):
    """x + sin^2(alpha x) / alpha, with a learned alpha per channel."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.alpha[None, :, None]
        return x + torch.sin(x * a).pow(2) / (a + 1e-9)


class ResBlock(nn.Module):
    """HiFi-GAN residual block with Snake activations: per dilation, x += conv2(snake(conv1_d(snake(x))))."""

    def __init__(self, channels: int, kernel: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(
            _wn_conv(channels, channels, kernel, 1, dilation=d, padding=_same_padding(kernel, d)) for d in dilations
        )
        self.convs2 = nn.ModuleList(
            _wn_conv(channels, channels, kernel, 1, dilation=1, padding=_same_padding(kernel)) for _ in dilations
        )
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c1, c2, a1, a2 in zip(self.convs1, self.convs2, self.activations1, self.activations2, strict=True):
            x = x + c2(a2(c1(a1(x))))
        return x


class F0Predictor(nn.Module):
    """Mel -> F0 in Hz per frame: 5 x (weight-normed conv k3 + ELU), a linear head, then abs."""

    def __init__(self, in_channels: int, channels: int, num_convs: int = 5) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(num_convs):
            layers += [_wn_conv(in_channels if i == 0 else channels, channels, 3, padding=1), nn.ELU()]
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, 1)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        h = self.condnet(mel).transpose(1, 2)
        return self.classifier(h).squeeze(-1).abs()


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    # Drawn on the generator's own device so one CPU generator can drive a model on any device.
    device = generator.device if generator is not None else like.device
    return torch.rand(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def _normal_in_layout(
    shape: tuple[int, ...], perm: tuple[int, ...], generator: torch.Generator | None, like: torch.Tensor
) -> torch.Tensor:
    """N(0, 1) of `shape` whose memory is laid out as `shape` permuted by `perm`, filled as upstream's
    `randn_like` fills a strided view: `empty(permuted).permute(back).normal_()`. Which elements get which draw
    (and, on the CPU, the sampling path) follow the memory layout, so only this reproduces upstream's values."""
    device = generator.device if generator is not None else like.device
    stored = tuple(shape[i] for i in perm)
    back = tuple(perm.index(i) for i in range(len(perm)))
    out = torch.empty(stored, device=device, dtype=like.dtype).permute(back)
    return out.normal_(generator=generator).to(like.device)


class SourceModule(nn.Module):
    """Harmonic-plus-noise NSF source, 24 kHz variant (upstream `SourceModuleHnNSF2` + `SineGen2`).

    Input: F0 in Hz at the sample rate, (B, L, 1). Output: one excitation channel, (B, L, 1).
    The per-harmonic phase increments are integrated at the mel frame rate and linearly interpolated back to
    the sample rate (this keeps the phase smooth across frame boundaries where the upsampled F0 steps).
    """

    def __init__(self, cfg: HiFTConfig) -> None:
        super().__init__()
        self.sampling_rate = cfg.sampling_rate
        self.upsample_scale = cfg.hop_length
        self.num_harmonics = cfg.nb_harmonics + 1  # fundamental + overtones
        self.sine_amp = cfg.nsf_alpha
        self.noise_std = cfg.nsf_sigma
        self.voiced_threshold = cfg.nsf_voiced_threshold
        self.l_linear = nn.Linear(self.num_harmonics, 1)

    def forward(self, f0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        batch, length, _ = f0.shape
        multiples = torch.arange(1, self.num_harmonics + 1, device=f0.device, dtype=f0.dtype)
        rad = (f0 * multiples / self.sampling_rate) % 1  # cycles per sample, (B, L, H)
        # Random initial phase per overtone (the fundamental starts at 0). Drawn before the noise, in upstream's
        # order, so a CPU generator seeded like upstream's global RNG gives the same excitation.
        initial = _uniform((batch, self.num_harmonics), generator, f0)
        initial[:, 0] = 0
        rad[:, 0, :] = rad[:, 0, :] + initial
        scale = float(self.upsample_scale)
        rad_frames = F.interpolate(rad.transpose(1, 2), scale_factor=1.0 / scale, mode="linear")
        phase = torch.cumsum(rad_frames, dim=2) * (2 * math.pi)
        phase = F.interpolate(phase * scale, scale_factor=scale, mode="linear").transpose(1, 2)
        sines = torch.sin(phase) * self.sine_amp

        voiced = (f0 > self.voiced_threshold).to(f0.dtype)
        # Unvoiced frames get noise of about the sine amplitude, voiced ones a faint noise floor.
        noise_amp = voiced * self.noise_std + (1 - voiced) * (self.sine_amp / 3)
        # Upstream's sines are a transposed view of (B, H, L) memory and it draws randn_like(sines): same layout.
        noise = noise_amp * _normal_in_layout((batch, length, self.num_harmonics), (0, 2, 1), generator, f0)
        excitation = sines * voiced + noise
        out = torch.tanh(self.l_linear(excitation))
        # Upstream's source module then draws one unused randn_like(uv), (B, L, 1): drawn and dropped here too,
        # so the next call (the next streamed chunk) starts at the same point of the stream.
        _normal_in_layout((batch, length, 1), (0, 1, 2), generator, f0)
        return out


class HiFTGenerator(nn.Module):
    """HiFTNet generator. Module names match upstream `HiFTGenerator` so `hift.pt` loads unchanged."""

    def __init__(self, cfg: HiFTConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or HiFTConfig()
        cfg.validate()
        self.cfg = cfg
        self.sampling_rate = cfg.sampling_rate
        self.hop_length = cfg.hop_length
        n_fft = cfg.istft_n_fft
        spec_channels = n_fft + 2  # real + imaginary parts of n_fft // 2 + 1 bins
        n_up = len(cfg.upsample_rates)
        ch = [cfg.base_channels // (2**i) for i in range(n_up + 1)]

        self.m_source = SourceModule(cfg)
        self.conv_pre = _wn_conv(cfg.in_channels, cfg.base_channels, 7, 1, padding=3)
        self.ups = nn.ModuleList(
            weight_norm(nn.ConvTranspose1d(ch[i], ch[i + 1], k, u, padding=(k - u) // 2))
            for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes, strict=True))
        )
        # Source branch i brings the excitation STFT (one frame per hop samples) down to the rate of stage i.
        down_rates = [1, *reversed(cfg.upsample_rates[1:])]
        cum_rates = list(reversed([math.prod(down_rates[: j + 1]) for j in range(n_up)]))
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        for i, (rate, k, d) in enumerate(
            zip(cum_rates, cfg.source_resblock_kernel_sizes, cfg.source_resblock_dilations, strict=True)
        ):
            if rate == 1:
                self.source_downs.append(nn.Conv1d(spec_channels, ch[i + 1], 1, 1))
            else:
                self.source_downs.append(nn.Conv1d(spec_channels, ch[i + 1], rate * 2, rate, padding=rate // 2))
            self.source_resblocks.append(ResBlock(ch[i + 1], k, d))
        self.resblocks = nn.ModuleList(
            ResBlock(ch[i + 1], k, d)
            for i in range(n_up)
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilations, strict=True)
        )
        self.conv_post = _wn_conv(ch[n_up], spec_channels, 7, 1, padding=3)
        self.f0_predictor = F0Predictor(cfg.in_channels, cfg.f0_channels)
        # Periodic Hann (scipy get_window("hann", n, fftbins=True)); not part of the checkpoint.
        self.register_buffer("stft_window", torch.hann_window(n_fft, periodic=True), persistent=False)
        # None: the torch modules. Else an object with `f0(mel)` and `decode(mel, source)` (the exported
        # graphs, stepaudio2.token2wav.engine); the seeded source module always runs here.
        self.engine: Any = None

    # ---- inference -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def inference(
        self,
        speech_feat: torch.Tensor,
        cache_source: torch.Tensor | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mel (B, mel_bins, T) -> (waveform (B, T * hop), excitation (B, 1, T * hop)).

        `cache_source` (B, 1, S), S <= T * hop: the excitation of the previous chunk's overlap; it replaces the
        start of the new excitation so the re-synthesised overlap matches what was played (streaming).
        `generator` drives the random phase and noise of the excitation (None: torch's global RNG). A sequence
        gives each row its own generator (several streams in one batch): row i then draws exactly what it
        would draw alone.
        """
        x = self._check_mel(speech_feat)
        f0 = self.f0_predictor(x) if self.engine is None else self.engine.f0(x)  # (B, T) Hz
        f0_samples = f0.repeat_interleave(self.hop_length, dim=1).unsqueeze(-1)  # nearest upsampling, (B, L, 1)
        if generator is None or isinstance(generator, torch.Generator):
            source = self.m_source(f0_samples, generator)
        else:
            if len(generator) != x.shape[0]:
                raise InvalidInputError(f"HiFT got {len(generator)} generators for a batch of {x.shape[0]}")
            source = torch.cat([self.m_source(f0_samples[i : i + 1], g) for i, g in enumerate(generator)])
        source = source.transpose(1, 2)  # (B, 1, L)
        if cache_source is not None and cache_source.shape[-1] > 0:
            cache = self._check_cache(cache_source, source)
            source[:, :, : cache.shape[2]] = cache
        wav = self.decode(x, source) if self.engine is None else self.engine.decode(x, source)
        return wav, source

    def _stft(self, source: torch.Tensor) -> torch.Tensor:
        """(B, 1, L) -> (B, n_fft + 2, L / hop + 1): real parts then imaginary parts."""
        n_fft, hop = self.cfg.istft_n_fft, self.cfg.istft_hop
        spec = torch.stft(source.squeeze(1), n_fft, hop, n_fft, window=self.stft_window, return_complex=True)
        return torch.cat([spec.real, spec.imag], dim=1)

    def _istft(self, real: torch.Tensor, imag: torch.Tensor) -> torch.Tensor:
        n_fft, hop = self.cfg.istft_n_fft, self.cfg.istft_hop
        return torch.istft(torch.complex(real, imag), n_fft, hop, n_fft, window=self.stft_window)

    def decode(
        self, mel: torch.Tensor, source: torch.Tensor, stft: Callable | None = None, istft: Callable | None = None
    ) -> torch.Tensor:
        """Generator proper: mel (B, mel_bins, T) and excitation (B, 1, T * hop) -> waveform (B, T * hop).

        `stft` / `istft` replace torch's (same signatures as `_stft` / `_istft`): the exported graph passes
        convolution-based ones (stepaudio2.token2wav.graphs)."""
        cfg = self.cfg
        n_fft = cfg.istft_n_fft
        s_stft = (stft or self._stft)(source)  # (B, n_fft + 2, L / hop + 1)

        x = self.conv_pre(mel)
        n_kernels = len(cfg.resblock_kernel_sizes)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, cfg.lrelu_slope))
            if i == len(self.ups) - 1:
                x = F.pad(x, (1, 0), mode="reflect")  # one more frame, to match the STFT's L / hop + 1
            x = x + self.source_resblocks[i](self.source_downs[i](s_stft))
            acc = self.resblocks[i * n_kernels](x)
            for j in range(1, n_kernels):
                acc = acc + self.resblocks[i * n_kernels + j](x)
            x = acc / n_kernels
        x = self.conv_post(F.leaky_relu(x))  # default slope 0.01 here, as upstream
        bins = n_fft // 2 + 1
        magnitude = torch.exp(x[:, :bins]).clamp(max=1e2)
        phase = torch.sin(x[:, bins:])
        wav = (istft or self._istft)(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        return wav.clamp(-cfg.audio_limit, cfg.audio_limit)

    def _check_mel(self, mel: torch.Tensor) -> torch.Tensor:
        if not isinstance(mel, torch.Tensor) or mel.dim() != 3 or mel.shape[1] != self.cfg.in_channels:
            shape = tuple(mel.shape) if isinstance(mel, torch.Tensor) else type(mel).__name__
            raise InvalidInputError(f"HiFT expects a mel of shape (batch, {self.cfg.in_channels}, frames), got {shape}")
        if mel.shape[0] < 1 or mel.shape[2] < 1:
            raise InvalidInputError(f"HiFT got an empty mel {tuple(mel.shape)}")
        param = self.conv_pre.weight
        return mel.to(device=param.device, dtype=param.dtype)

    @staticmethod
    def _check_cache(cache: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        b, _, length = source.shape
        if cache.dim() != 3 or cache.shape[0] != b or cache.shape[1] != 1:
            raise InvalidInputError(f"cache_source must be ({b}, 1, samples), got {tuple(cache.shape)}")
        if cache.shape[2] > length:
            raise InvalidInputError(f"cache_source has {cache.shape[2]} samples, more than the {length} generated")
        return cache.to(device=source.device, dtype=source.dtype)

    # ---- weights ---------------------------------------------------------------------------------------------

    def fold_weight_norm(self) -> HiFTGenerator:
        """Replace every weight-norm parametrization by its plain weight (inference only: saves recomputing
        g * v / |v| on every call). The state dict then uses plain `weight` names."""
        for module in self.modules():
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        return self


# ---------------------------------------------------------------------------------------------------------------
# Loading


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_NAMES])
    return shown + (f" ... and {len(names) - _MAX_NAMES} more" if len(names) > _MAX_NAMES else "")


def normalize_hift_state_dict(raw: Mapping[str, Any], source: str = "hift.pt") -> dict[str, torch.Tensor]:
    """Strip the `generator.` prefix and map legacy weight-norm names (`weight_g`/`weight_v`) to the
    parametrization names the module uses. Non-tensor values and name clashes are CheckpointErrors."""
    out: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: entry {key!r} is not a named tensor")
        name = key[len(CHECKPOINT_PREFIX) :] if key.startswith(CHECKPOINT_PREFIX) else key
        head, _, leaf = name.rpartition(".")
        if leaf in _LEGACY_WN:
            name = f"{head}.{_LEGACY_WN[leaf]}" if head else _LEGACY_WN[leaf]
        if name in out:
            raise CheckpointError(f"{source}: tensor '{key}' appears twice (old and new weight-norm names?)")
        if not value.is_floating_point():
            raise CheckpointError(f"{source}: tensor '{key}' has dtype {value.dtype}, expected floating point")
        out[name] = value
    return out


def _shape_of(state: Mapping[str, torch.Tensor], name: str, ndim: int, source: str) -> tuple[int, ...]:
    if name not in state:
        raise CheckpointError(f"{source}: missing tensor '{name}'")
    shape = tuple(state[name].shape)
    if len(shape) != ndim:
        raise CheckpointError(f"{source}: tensor '{name}' has shape {shape}, expected {ndim} dimensions")
    return shape


def hift_config_from_state_dict(state: Mapping[str, torch.Tensor], source: str = "hift.pt") -> HiFTConfig:
    """The config whose channel counts fit `state` (normalized names). Only sizes that differ between presets
    are read; the rest are the upstream defaults, and the strict check catches any other mismatch."""
    base, mel_bins, _ = _shape_of(state, f"conv_pre.{_WN_V}", 3, source)
    f0_channels, _, _ = _shape_of(state, f"f0_predictor.condnet.0.{_WN_V}", 3, source)
    _, harmonics = _shape_of(state, "m_source.l_linear.weight", 2, source)
    cfg = replace(HiFTConfig(), in_channels=mel_bins, base_channels=base, f0_channels=f0_channels,
                  nb_harmonics=harmonics - 1)
    try:
        cfg.validate()
    except CheckpointError as exc:
        raise CheckpointError(f"{source}: tensor shapes give an unusable config ({exc})") from None
    return cfg


def check_hift_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "hift.pt") -> None:
    """Raise CheckpointError naming every missing, unexpected and misshaped tensor."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(
        f"{k} {tuple(state[k].shape)} (expected {expected[k]})"
        for k in set(expected) & set(state)
        if tuple(state[k].shape) != expected[k]
    )
    problems = []
    if missing:
        problems.append(f"missing tensor(s): {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected tensor(s): {_names(unexpected)}")
    if misshaped:
        problems.append(f"misshaped tensor(s): {_names(misshaped)}")
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))


def load_hift(path: str | Path, *, fold_weight_norm: bool = True) -> HiFTGenerator:
    """Load `hift.pt` strictly into an fp32 HiFTGenerator in eval mode (on the CPU; move it with `.to`).

    Accepts keys with or without the `generator.` prefix and both weight-norm namings. With
    `fold_weight_norm` (default) the weight norm is folded into plain weights after the checks.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"HiFT checkpoint {p} is missing")
    try:
        raw = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file; all mean "unreadable"
        raise CheckpointError(f"{p.name}: cannot be read as a torch state dict ({exc})") from exc
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{p.name}: expected a state dict, got {type(raw).__name__}")
    state = normalize_hift_state_dict(raw, p.name)
    model = HiFTGenerator(hift_config_from_state_dict(state, p.name))
    check_hift_state_dict(model, state, p.name)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    model.float().eval()
    if fold_weight_norm:
        model.fold_weight_norm()
    return model
