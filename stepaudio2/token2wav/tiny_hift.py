"""Small seeded stand-ins for the token2wav files we do not train: `hift.pt` and the two ONNX front ends.

- `write_tiny_hift`: a random HiFT generator with the real module names and layout (fp32 state dict, keys
  prefixed `generator.`, weight norm in torch's parametrization naming) at reduced channel counts.
- `write_standin_onnx`: `speech_tokenizer_v2_25hz.onnx` and `campplus.onnx` built from small seeded torch
  modules, with the input/output names, dtypes and ranks the released files have (as far as public code shows):

  speech tokenizer: inputs `feats` float32 (1, 128, T) log-mel at 100 Hz and `feats_length` int32 (1,);
  output `indices` int64 (1, T') with T' = ceil(ceil(T / 2) / 2): two stride-2 convs (k3, p1), i.e. 25 Hz, and
  codes in 0..6560 from an 8-dimensional 3-level FSQ (3^8 = 6561 codes). (The v1 tokenizer's output is
  (1, 1, T'); public v2 callers index it as (1, T'). Consumers flatten it, so either rank works.)
  CAM++: input `input` float32 (1, T, 80) mean-normalised Kaldi fbank; output `output` float32 (1, 192).
  (3D-Speaker's own exporter names them feature/embedding; CosyVoice's campplus.onnx uses input/output, and
  upstream feeds it by position anyway.)

  Both graphs carry the metadata entry `stepaudio2_standin=1` so a deployment can tell them from the real ones.
  Codes and x-vectors depend on the audio but carry no meaning.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from stepaudio2.errors import InvalidInputError
from stepaudio2.token2wav.hift import CHECKPOINT_PREFIX, HiFTConfig, HiFTGenerator

HIFT_FILE = "hift.pt"
TOKENIZER_FILE = "speech_tokenizer_v2_25hz.onnx"
CAMPPLUS_FILE = "campplus.onnx"
STANDIN_METADATA_KEY = "stepaudio2_standin"

# preset -> (base_channels, f0_channels); the real model is (512, 512).
_PRESETS: dict[str, tuple[int, int]] = {"tiny": (32, 32), "small": (128, 128)}
PRESETS = tuple(_PRESETS)

S3_MELS = 128
S3_FSQ_DIMS = 8  # 3 levels each -> 6561 codes
CAMPPLUS_MELS = 80
XVECTOR_DIM = 192
_STANDIN_F0_HZ = 150.0  # centre of the random F0 track, so the harmonic (voiced) path of the source is used


def tiny_hift_config(preset: str = "tiny") -> HiFTConfig:
    if preset not in _PRESETS:
        raise InvalidInputError(f"unknown HiFT preset '{preset}' (choose from {', '.join(PRESETS)})")
    base, f0 = _PRESETS[preset]
    return HiFTConfig(base_channels=base, f0_channels=f0)


@torch.no_grad()
def _init_hift(model: HiFTGenerator, seed: int) -> None:
    """Fill every parameter from one seeded generator (independent of torch's default initialisers)."""
    gen = torch.Generator().manual_seed(seed)

    def uniform(shape: torch.Size, bound: float) -> torch.Tensor:
        return (torch.rand(shape, generator=gen) * 2 - 1) * bound

    params = dict(model.named_parameters())
    for name in sorted(params):
        p = params[name]
        if name.endswith("original0"):
            continue  # weight-norm gains are set from their direction tensors below
        if name.endswith("alpha"):
            p.copy_(1.0 + 0.2 * torch.rand(p.shape, generator=gen))
        elif p.dim() == 1:
            p.copy_(uniform(p.shape, 0.05))
        else:
            fan_in = p.shape[0] * p.shape[2] if "ups." in name else p[0].numel()  # ConvTranspose: (in, out, k)
            p.copy_(uniform(p.shape, 1.0 / math.sqrt(fan_in)))
    for name in sorted(params):
        if name.endswith("original0"):
            v = params[name.replace("original0", "original1")]
            # Gain = |v| per output slice (effective weight = v), jittered so a g/v mix-up changes the output.
            norm = v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))
            params[name].copy_(norm * (1.0 + 0.1 * torch.rand(norm.shape, generator=gen)))
    # The upsampling stack shrinks the signal; this gain brings the predicted log-magnitudes and phases to about
    # unit scale, so the audio is neither silent nor clipped.
    model.conv_post.parametrizations.weight.original0.mul_(30.0)
    model.f0_predictor.classifier.bias.fill_(_STANDIN_F0_HZ)
    model.f0_predictor.classifier.weight.mul_(20.0)


def write_tiny_hift(token2wav_dir: str | Path, seed: int, preset: str = "tiny") -> Path:
    """Write `<token2wav_dir>/hift.pt`: a random HiFT at the preset's size, keyed like the released file."""
    cfg = tiny_hift_config(preset)
    out_dir = Path(token2wav_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = HiFTGenerator(cfg)
    _init_hift(model, seed)
    state = {CHECKPOINT_PREFIX + k: v.detach().clone().float().contiguous() for k, v in model.state_dict().items()}
    path = out_dir / HIFT_FILE
    torch.save(state, path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# ONNX stand-ins


class StandinS3Tokenizer(nn.Module):
    """128-mel (100 Hz) -> 25 Hz codes: two stride-2 convs as in the real encoder's front, then 8-dim FSQ."""

    def __init__(self, channels: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(S3_MELS, channels, 3, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.project_down = nn.Linear(channels, S3_FSQ_DIMS)
        self.register_buffer("powers", 3 ** torch.arange(S3_FSQ_DIMS, dtype=torch.int64), persistent=False)

    def forward(self, feats: torch.Tensor, feats_length: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.conv1(feats))
        h = F.gelu(self.conv2(h)).transpose(1, 2)  # (B, T', C)
        # Normalised projection: every digit takes all three levels, so codes spread over the whole codebook.
        z = torch.tanh(2.0 * F.layer_norm(self.project_down(h), (S3_FSQ_DIMS,)))
        digits = torch.round(z * 0.999).to(torch.int64) + 1  # {0, 1, 2}
        codes = (digits * self.powers).sum(dim=-1)  # (B, T') in 0..6560
        # Frames past each item's length (after both strides) are padding: code 0 there.
        n = torch.div(feats_length.to(torch.int64) - 1, 2, rounding_mode="floor") + 1
        n = torch.div(n - 1, 2, rounding_mode="floor") + 1
        positions = torch.arange(codes.shape[1], device=codes.device, dtype=torch.int64)
        return torch.where(positions[None, :] < n[:, None], codes, torch.zeros_like(codes))


class StandinCAMPPlus(nn.Module):
    """(B, T, 80) fbank -> (B, 192) embedding: two convs over time, mean + std pooling, a linear layer."""

    def __init__(self, channels: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(CAMPPLUS_MELS, channels, 5, padding=2)
        self.conv2 = nn.Conv1d(channels, channels, 3, padding=1)
        self.dense = nn.Linear(2 * channels, XVECTOR_DIM)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(feats.transpose(1, 2)))
        h = F.relu(self.conv2(h))
        mean = h.mean(dim=2)
        std = torch.sqrt((h * h).mean(dim=2) - mean * mean + 1e-5)
        return self.dense(torch.cat([mean, std], dim=1))


def seeded_standin(module_cls: type[nn.Module], seed: int) -> nn.Module:
    """The stand-in module `write_standin_onnx` exports, rebuilt from the same seed (for parity checks)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return module_cls().eval()


def _mark_standin(path: Path) -> None:
    import onnx

    model = onnx.load(str(path))
    entry = model.metadata_props.add()
    entry.key, entry.value = STANDIN_METADATA_KEY, "1"
    onnx.save(model, str(path))


def _export(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path, inputs: list[str], outputs: list[str],
            dynamic_axes: dict[str, dict[int, str]]) -> None:
    # Legacy (TorchScript) exporter: these graphs use no attention, so its shape handling is exact (ecosystem P2),
    # and it takes well under a second where the dynamo exporter takes several.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs,
                          dynamic_axes=dynamic_axes, opset_version=17, dynamo=False)
    _mark_standin(path)


def write_standin_onnx(token2wav_dir: str | Path, seed: int) -> tuple[Path, Path]:
    """Write stand-in `speech_tokenizer_v2_25hz.onnx` and `campplus.onnx`; returns their paths."""
    out_dir = Path(token2wav_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok_path, camp_path = out_dir / TOKENIZER_FILE, out_dir / CAMPPLUS_FILE

    tokenizer = seeded_standin(StandinS3Tokenizer, seed)
    feats = torch.randn(2, S3_MELS, 37)  # batch >= 2 and an odd length: nothing gets specialised
    lengths = torch.tensor([37, 37], dtype=torch.int32)
    _export(tokenizer, (feats, lengths), tok_path, ["feats", "feats_length"], ["indices"],
            {"feats": {0: "batch", 2: "frames"}, "feats_length": {0: "batch"}, "indices": {0: "batch", 1: "tokens"}})

    campplus = seeded_standin(StandinCAMPPlus, seed + 1)
    _export(campplus, (torch.randn(2, 41, CAMPPLUS_MELS),), camp_path, ["input"], ["output"],
            {"input": {0: "batch", 1: "frames"}, "output": {0: "batch"}})
    return tok_path, camp_path
