"""`flow.yaml` of the token2wav checkpoint, parsed into dataclasses (spec §2.4).

The real file is HyperPyYAML: the components carry `!new:<python class>` tags (and HyperPyYAML files may hold
`!apply:`, `!ref`, `!name:` nodes too). We never build objects from tags; a permissive loader reads every tagged
node as its plain value, remembers the tag of mappings, and resolves simple `!ref <key>` references. Only the
values are used. Every dimension of the flow modules comes from here.
"""

from __future__ import annotations

import re
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from stepaudio2.errors import CheckpointError

FLOW_YAML = "flow.yaml"

# Tags of the real file, written back by the tiny writer (spec §2.4).
FLOW_TAG = "!new:cosyvoice2.flow.flow.CausalMaskedDiffWithXvec"
ENCODER_TAG = "!new:cosyvoice2.transformer.upsample_encoder_v2.UpsampleConformerEncoderV2"
CFM_TAG = "!new:cosyvoice2.flow.flow_matching.CausalConditionalCFM"
DIT_TAG = "!new:cosyvoice2.flow.decoder_dit.DiT"


@dataclass(frozen=True)
class EncoderConfig:
    """`flow.encoder`: UpsampleConformerEncoderV2."""

    input_size: int
    output_size: int
    attention_heads: int
    linear_units: int
    num_blocks: int
    num_up_blocks: int
    pre_lookahead_len: int = 3
    up_stride: int = 2
    up_scale_factor: float = 2.0
    input_layer: str = "linear"
    pos_enc_layer_type: str = "rel_pos_espnet"
    selfattention_layer_type: str = "rel_selfattn"
    key_bias: bool = True
    normalize_before: bool = True
    activation_type: str = "swish"
    dropout_rate: float = 0.1
    positional_dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.0


@dataclass(frozen=True)
class DiTConfig:
    """`flow.decoder.estimator`: the DiT velocity estimator."""

    in_channels: int
    out_channels: int
    depth: int
    num_heads: int
    head_dim: int
    hidden_size: int
    mlp_ratio: float = 4.0


@dataclass(frozen=True)
class CFMConfig:
    """`flow.decoder`: CausalConditionalCFM."""

    estimator: DiTConfig
    inference_cfg_rate: float = 0.7


@dataclass(frozen=True)
class FlowConfig:
    """`flow`: CausalMaskedDiffWithXvec (token embedding, x-vector projection, encoder, CFM)."""

    input_size: int
    output_size: int
    spk_embed_dim: int
    vocab_size: int
    encoder: EncoderConfig
    decoder: CFMConfig
    output_type: str = "mel"

    @property
    def mel_bins(self) -> int:
        return self.output_size

    @property
    def pre_lookahead_len(self) -> int:
        return self.encoder.pre_lookahead_len

    @property
    def token_mel_ratio(self) -> int:
        """Mel frames per speech token (the encoder's upsampling stride)."""
        return self.encoder.up_stride


# ---------------------------------------------------------------------------------------------------------------
# Permissive HyperPyYAML reading


class _TaggedDict(dict):
    """A mapping read from a tagged node; `tag` keeps the tag (e.g. `!new:...DiT`)."""

    tag: str = ""


@dataclass(frozen=True)
class _Ref:
    expr: str


class _PermissiveLoader(yaml.SafeLoader):
    """SafeLoader that reads any `!tag` node as its plain value instead of failing."""


def _construct_tagged(loader: _PermissiveLoader, tag_suffix: str, node: yaml.Node) -> Any:
    tag = "!" + tag_suffix
    if isinstance(node, yaml.MappingNode):
        out = _TaggedDict(loader.construct_mapping(node, deep=True))
        out.tag = tag
        return out
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    value = loader.construct_scalar(node)
    if tag == "!ref":
        return _Ref(str(value))
    return value


_PermissiveLoader.add_multi_constructor("!", _construct_tagged)

_REF = re.compile(r"^<([^<>]+)>$")


def _resolve_refs(value: Any, root: dict[str, Any], depth: int = 0) -> Any:
    """Resolve `!ref <a.b>` nodes that name another key; anything fancier is left as a string."""
    if depth > 32:
        raise CheckpointError(f"{FLOW_YAML}: !ref chain too deep")
    if isinstance(value, _Ref):
        m = _REF.match(value.expr.strip())
        if not m:
            return value.expr
        target: Any = root
        for part in m.group(1).split("."):
            if not isinstance(target, dict) or part not in target:
                raise CheckpointError(f"{FLOW_YAML}: !ref {value.expr} names no key")
            target = target[part]
        return _resolve_refs(target, root, depth + 1)
    if isinstance(value, dict):
        out = _TaggedDict({k: _resolve_refs(v, root, depth) for k, v in value.items()})
        out.tag = getattr(value, "tag", "")
        return out
    if isinstance(value, list):
        return [_resolve_refs(v, root, depth) for v in value]
    return value


def load_yaml_values(text: str) -> dict[str, Any]:
    """Read HyperPyYAML text into plain dicts (tags of mappings kept in `.tag`)."""
    try:
        raw = yaml.load(text, Loader=_PermissiveLoader)  # noqa: S506 - the loader builds only plain values
    except yaml.YAMLError as exc:
        raise CheckpointError(f"{FLOW_YAML} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{FLOW_YAML} must hold a mapping at the top level")
    return _resolve_refs(raw, raw)


# ---------------------------------------------------------------------------------------------------------------
# Values -> dataclasses

_SUPPORTED = {
    "input_layer": "linear",
    "pos_enc_layer_type": "rel_pos_espnet",
    "selfattention_layer_type": "rel_selfattn",
    "activation_type": "swish",
    "normalize_before": True,
}


def _coerce(value: Any, default: Any, typ: str, where: str) -> Any:
    try:
        if typ == "int":
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        if typ == "float":
            return float(value)
        if typ == "bool":
            if isinstance(value, str):
                return {"true": True, "false": False}[value.lower()]
            return bool(value)
        return str(value)
    except (TypeError, ValueError, KeyError):
        raise CheckpointError(f"{FLOW_YAML}: {where} has an invalid value {value!r}") from None


def _pick(section: Any, cls: type, where: str, **nested: Any) -> Any:
    if not isinstance(section, dict):
        raise CheckpointError(f"{FLOW_YAML}: {where} must be a mapping")
    kwargs: dict[str, Any] = dict(nested)
    for f in fields(cls):
        if f.name in nested:
            continue
        if f.name not in section:
            if f.default is MISSING:
                raise CheckpointError(f"{FLOW_YAML}: {where}.{f.name} is missing")
            continue
        kwargs[f.name] = _coerce(section[f.name], f.default, str(f.type), f"{where}.{f.name}")
    return cls(**kwargs)


def _check_tag(section: Any, expected: str, where: str) -> None:
    tag = getattr(section, "tag", "")
    # An untagged mapping is accepted; a tag naming another class is a different model.
    if tag and tag.split(".")[-1] != expected.split(".")[-1]:
        raise CheckpointError(f"{FLOW_YAML}: {where} is {tag}, expected {expected}")


def parse_flow_config(values: dict[str, Any]) -> FlowConfig:
    """Build a FlowConfig from the values of flow.yaml and check that the modules can honour it."""
    if "flow" not in values:
        raise CheckpointError(f"{FLOW_YAML}: no 'flow' section")
    flow = values["flow"]
    _check_tag(flow, FLOW_TAG, "flow")
    if not isinstance(flow, dict) or "encoder" not in flow or "decoder" not in flow:
        raise CheckpointError(f"{FLOW_YAML}: flow needs 'encoder' and 'decoder' sections")
    _check_tag(flow["encoder"], ENCODER_TAG, "flow.encoder")
    _check_tag(flow["decoder"], CFM_TAG, "flow.decoder")
    decoder = flow["decoder"]
    if not isinstance(decoder, dict) or "estimator" not in decoder:
        raise CheckpointError(f"{FLOW_YAML}: flow.decoder needs an 'estimator' section")
    _check_tag(decoder["estimator"], DIT_TAG, "flow.decoder.estimator")

    encoder = _pick(flow["encoder"], EncoderConfig, "flow.encoder")
    estimator = _pick(decoder["estimator"], DiTConfig, "flow.decoder.estimator")
    cfm = _pick(decoder, CFMConfig, "flow.decoder", estimator=estimator)
    cfg = _pick(flow, FlowConfig, "flow", encoder=encoder, decoder=cfm)
    _validate(cfg)
    return cfg


def _validate(cfg: FlowConfig) -> None:
    enc, dit = cfg.encoder, cfg.decoder.estimator
    for name, want in _SUPPORTED.items():
        if getattr(enc, name) != want:
            raise CheckpointError(f"{FLOW_YAML}: flow.encoder.{name}={getattr(enc, name)!r} is unsupported "
                                  f"(only {want!r})")
    problems = []
    if cfg.output_type != "mel":
        problems.append(f"flow.output_type={cfg.output_type!r} (only 'mel')")
    if enc.input_size != cfg.input_size:
        problems.append(f"flow.encoder.input_size {enc.input_size} != flow.input_size {cfg.input_size}")
    if enc.input_size != enc.output_size:
        # up_embed is built as Linear(input_size, output_size) but fed encoder outputs.
        problems.append(f"flow.encoder.input_size {enc.input_size} != output_size {enc.output_size}")
    if enc.output_size % enc.attention_heads:
        problems.append(f"flow.encoder.output_size {enc.output_size} is not a multiple of attention_heads")
    if enc.pre_lookahead_len < 1:
        problems.append("flow.encoder.pre_lookahead_len must be >= 1")
    if enc.up_stride < 1 or float(enc.up_scale_factor) != float(enc.up_stride):
        problems.append("flow.encoder.up_scale_factor must equal up_stride (mel frames per token)")
    if dit.in_channels != 4 * cfg.output_size:
        # The estimator input is [x, mu, spk, cond], each output_size channels.
        problems.append(f"flow.decoder.estimator.in_channels {dit.in_channels} != 4 * output_size")
    if dit.out_channels != cfg.output_size:
        problems.append(f"flow.decoder.estimator.out_channels {dit.out_channels} != flow.output_size")
    for name in ("input_size", "output_size", "spk_embed_dim", "vocab_size"):
        if getattr(cfg, name) < 1:
            problems.append(f"flow.{name} must be positive")
    for name in ("num_blocks", "num_up_blocks", "linear_units", "attention_heads"):
        if getattr(enc, name) < 1:
            problems.append(f"flow.encoder.{name} must be positive")
    for name in ("depth", "num_heads", "head_dim", "hidden_size"):
        if getattr(dit, name) < 1:
            problems.append(f"flow.decoder.estimator.{name} must be positive")
    if problems:
        raise CheckpointError(f"{FLOW_YAML}: " + "; ".join(problems))


def load_flow_config(token2wav_dir: str | Path) -> FlowConfig:
    """Parse `<token2wav_dir>/flow.yaml`."""
    path = Path(token2wav_dir) / FLOW_YAML
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    return parse_flow_config(load_yaml_values(path.read_text(encoding="utf-8")))


def flow_config_to_yaml(cfg: FlowConfig, header: str = "") -> str:
    """HyperPyYAML text with the same structure and tags as the released flow.yaml."""

    def scalar(v: Any) -> str:
        if isinstance(v, bool):
            return "True" if v else "False"
        if isinstance(v, str):
            return f"'{v}'"
        return repr(v)

    def block(obj: Any, indent: int, skip: tuple[str, ...] = ()) -> list[str]:
        pad = " " * indent
        return [f"{pad}{f.name}: {scalar(getattr(obj, f.name))}" for f in fields(obj) if f.name not in skip]

    lines = [f"# {line}" for line in header.splitlines()] if header else []
    lines += [
        "__set_seed1: !apply:random.seed [1986]",
        "__set_seed2: !apply:numpy.random.seed [1986]",
        "__set_seed3: !apply:torch.manual_seed [1986]",
        "",
        f"flow: {FLOW_TAG}",
        *block(cfg, 4, skip=("encoder", "decoder")),
        f"    encoder: {ENCODER_TAG}",
        *block(cfg.encoder, 8),
        f"    decoder: {CFM_TAG}",
        *block(cfg.decoder, 8, skip=("estimator",)),
        f"        estimator: {DIT_TAG}",
        *block(cfg.decoder.estimator, 12),
        "",
    ]
    return "\n".join(lines)
