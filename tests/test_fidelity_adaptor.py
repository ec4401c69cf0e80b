"""Issue 14 item 9: our tiny checkpoints load into upstream's adaptor, whose width is hard-coded to 2048.

Upstream's remote code builds the adaptor as Conv1d(n_state, n_state, k, stride) -> Linear(n_state, 2048) ->
ReLU -> Linear(2048, llm_dim), the 2048 being a literal (not in config.json). That module is rebuilt here from
the config and every `adapter.*` tensor of the checkpoint must load into it strictly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from torch import nn

from stepaudio2.checkpoint import read_state_dict
from stepaudio2.export.tiny import make_tiny_checkpoint

UPSTREAM_ADAPTOR_WIDTH = 2048


class UpstreamShapedAdaptor(nn.Module):
    def __init__(self, n_state: int, llm_dim: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(n_state, n_state, kernel, stride, padding=1)
        self.linear1 = nn.Linear(n_state, UPSTREAM_ADAPTOR_WIDTH)
        self.relu = nn.ReLU()
        self.linear2 = nn.Linear(UPSTREAM_ADAPTOR_WIDTH, llm_dim)


def _load_into_upstream_adaptor(ckpt: Path) -> None:
    audio = json.loads((ckpt / "config.json").read_text())["audio_encoder_config"]
    module = UpstreamShapedAdaptor(audio["n_audio_state"], audio["llm_dim"], audio["kernel_size"],
                                   audio["adapter_stride"])
    state = {k[len("adapter."):]: v.float() for k, v in read_state_dict(ckpt).items() if k.startswith("adapter.")}
    module.load_state_dict(state, strict=True)  # raises on any missing, unexpected or misshaped tensor


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_tiny_presets_load_into_upstream_adaptor(preset: str, tmp_path: Path) -> None:
    _load_into_upstream_adaptor(make_tiny_checkpoint(tmp_path / preset, seed=0, preset=preset,
                                                     with_token2wav=False))


def test_taught_checkpoint_loads_into_upstream_adaptor(taught_checkpoint: Path) -> None:
    _load_into_upstream_adaptor(taught_checkpoint)


def test_other_widths_are_refused_by_the_upstream_shape(tmp_path: Path) -> None:
    # The check can fail: a 128-wide adaptor (the old tiny preset) does not load.
    ckpt = make_tiny_checkpoint(tmp_path / "t", seed=0, preset="tiny", with_token2wav=False)
    state = read_state_dict(ckpt)
    audio = json.loads((ckpt / "config.json").read_text())["audio_encoder_config"]
    module = UpstreamShapedAdaptor(audio["n_audio_state"], audio["llm_dim"], 3, 2)
    narrow = {k[len("adapter."):]: v.float() for k, v in state.items() if k.startswith("adapter.")}
    narrow["linear1.weight"] = narrow["linear1.weight"][:128]
    with pytest.raises(RuntimeError, match="size mismatch"):
        module.load_state_dict(narrow, strict=True)
