"""Strict loading of Hugging Face style checkpoints (spec §2.1, §2.3).

The LLM repository stores sharded `model-*.safetensors` listed by `model.safetensors.index.json` (a single
`model.safetensors` is accepted too). Tensors are bf16 on disk and load onto the CPU as fp32. Loading is strict:
a missing, unexpected or misshaped tensor is a CheckpointError that names it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from stepaudio2.errors import CheckpointError

if TYPE_CHECKING:
    import torch

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def weight_map(checkpoint_dir: str | Path) -> dict[str, str]:
    """Tensor name -> shard file name, from the index (or the single-file layout)."""
    root = Path(checkpoint_dir)
    index = root / INDEX_FILE
    if index.is_file():
        try:
            mapping = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index} is not a safetensors index: {exc}") from exc
        for shard in sorted(set(mapping.values())):
            if not (root / shard).is_file():
                raise CheckpointError(f"{INDEX_FILE} names shard {shard}, which is missing from {root}")
        return dict(mapping)
    if (root / SINGLE_FILE).is_file():
        from safetensors import safe_open

        with safe_open(root / SINGLE_FILE, framework="np") as f:
            return {k: SINGLE_FILE for k in f.keys()}
    raise CheckpointError(f"no {INDEX_FILE} or {SINGLE_FILE} in {root}")


def tensor_shapes(checkpoint_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """Shapes of every stored tensor, read from the safetensors headers only (no tensor data)."""
    from safetensors import safe_open

    root = Path(checkpoint_dir)
    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map(root).items():
        by_shard.setdefault(shard, []).append(name)
    shapes: dict[str, tuple[int, ...]] = {}
    for shard, names in by_shard.items():
        with safe_open(root / shard, framework="pt") as f:
            for name in names:
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def read_state_dict(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint as fp32 CPU tensors (bf16/fp16 are upcast)."""
    from safetensors import safe_open

    root = Path(checkpoint_dir)
    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map(root).items():
        by_shard.setdefault(shard, []).append(name)
    state: dict[str, torch.Tensor] = {}
    for shard, names in sorted(by_shard.items()):
        with safe_open(root / shard, framework="pt", device="cpu") as f:
            stored = set(f.keys())
            for name in names:
                if name not in stored:
                    raise CheckpointError(f"{INDEX_FILE} places tensor '{name}' in {shard}, which lacks it")
                t = f.get_tensor(name)
                state[name] = t.float() if t.is_floating_point() else t
    return state


def check_state_dict(
    expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]], what: str
) -> None:
    """Raise CheckpointError naming every missing, unexpected and misshaped tensor."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = [
        f"{k} (checkpoint {tuple(found[k])}, model {tuple(expected[k])})"
        for k in sorted(set(expected) & set(found))
        if tuple(found[k]) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append("missing tensor(s): " + ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else ""))
    if unexpected:
        problems.append(
            "unexpected tensor(s): " + ", ".join(unexpected[:20]) + (" ..." if len(unexpected) > 20 else "")
        )
    if misshaped:
        problems.append("misshaped tensor(s): " + ", ".join(misshaped[:20]))
    if problems:
        raise CheckpointError(f"{what}: " + "; ".join(problems))


def load_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """load_state_dict(strict=True), with the checks done first so every error names its tensor."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    check_state_dict(expected, {k: tuple(v.shape) for k, v in state.items()}, what)
    module.load_state_dict(dict(state), strict=True)
