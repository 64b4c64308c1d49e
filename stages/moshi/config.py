"""The Moshi LM's architecture as plain data, read from a Kyutai `config.json` or a built-in size.

Kyutai's key names are kept as they are (`dim`, `n_q`, `depformer_*`, ...) so their config files load
unchanged; a key we do not implement is a ConfigError rather than a silently different model.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rtpipe.stages.errors import ConfigError
from rtpipe.stages.mimi.codes import CODEBOOK_BINS

MOSHIKO_DELAYS = [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1]


@dataclass(frozen=True)
class LmConfig:
    """Architecture of the temporal transformer (`dim`, ...) and of the depformer (`depformer_*`)."""

    dim: int = 4096
    text_card: int = 32000
    existing_text_padding_id: int = 3
    existing_text_end_padding_id: int = 0
    n_q: int = 16
    dep_q: int = 8
    card: int = CODEBOOK_BINS  # the audio tokens are Mimi's codes (a config.json gives its own `card`)
    num_heads: int = 32
    num_layers: int = 32
    hidden_scale: float = 4.125
    causal: bool = True
    layer_scale: float | None = None
    context: int | None = 3000
    max_period: float = 10000.0
    gating: str = "silu"
    norm: str = "rms_norm_f32"
    positional_embedding: str = "rope"
    depformer_dim: int = 1024
    depformer_dim_feedforward: int | None = 4224
    depformer_num_heads: int = 16
    depformer_num_layers: int = 6
    depformer_layer_scale: float | None = None
    depformer_multi_linear: bool = True
    depformer_context: int | None = 8
    depformer_max_period: float = 10000.0
    depformer_gating: str = "silu"
    depformer_pos_emb: str = "none"
    depformer_weights_per_step: bool = True
    depformer_norm: str | None = None
    delays: list[int] = field(default_factory=lambda: list(MOSHIKO_DELAYS))

    # --- derived sizes ---
    @property
    def num_codebooks(self) -> int:
        """Streams the temporal transformer reads: text + n_q audio."""
        return self.n_q + 1

    @property
    def user_q(self) -> int:
        """Audio streams that come from the user (the input of the stage)."""
        return self.n_q - self.dep_q

    @property
    def dim_feedforward(self) -> int:
        return int(self.hidden_scale * self.dim)

    @property
    def depformer_feedforward(self) -> int:
        if self.depformer_dim_feedforward is None:
            return int(self.hidden_scale * self.depformer_dim)
        return self.depformer_dim_feedforward

    @property
    def max_delay(self) -> int:
        return max(self.delays)

    @property
    def depformer_steps(self) -> int:
        """Sets of depformer weights: one per codebook step, or one shared."""
        return self.dep_q if self.depformer_weights_per_step else 1

    def parameter_count(self) -> int:
        """Parameters LmModel(self) holds, counted from the sizes alone (no torch): what the model will
        cost in memory is known before anything is allocated. tests/test_moshi_loading.py checks it
        against the built model."""
        text_rows, audio_rows = self.text_card + 1, self.card + 1
        temporal = (
            self.n_q * audio_rows * self.dim
            + text_rows * self.dim
            + self.text_card * self.dim
            + _norm_parameters(self.norm, self.dim)
            + self.num_layers
            * _layer_parameters(self.dim, self.dim_feedforward, self.norm, self.gating, 1, self.layer_scale)
        )
        depformer_in = (self.dep_q if self.depformer_multi_linear else 1) * self.dim * self.depformer_dim
        depformer = (
            depformer_in
            + (self.dep_q - 1) * audio_rows * self.depformer_dim
            + text_rows * self.depformer_dim
            + self.dep_q * self.depformer_dim * self.card
            + self.depformer_num_layers
            * _layer_parameters(
                self.depformer_dim,
                self.depformer_feedforward,
                self.norm,
                self.depformer_gating,
                self.depformer_steps,
                self.depformer_layer_scale,
            )
        )
        return temporal + depformer

    def kv_cache_elements(self, context: int | None = None) -> int:
        """Elements of one conversation's temporal KV cache (keys and values of every layer)."""
        return 2 * self.num_layers * (context or self.context or 0) * self.dim

    def replace(self, **changes: Any) -> LmConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self, where: str) -> None:
        """Raises ConfigError naming `where.<key>` for values this implementation does not support."""

        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"{where}: {key} = {getattr(self, key)!r}: {why}")

        for key in (
            "dim",
            "n_q",
            "card",
            "text_card",
            "num_heads",
            "num_layers",
            "depformer_dim",
            "depformer_num_heads",
            "depformer_num_layers",
        ):
            if not isinstance(getattr(self, key), int) or getattr(self, key) <= 0:
                raise bad(key, "expected a positive integer")
        if not 0 < self.dep_q <= self.n_q:
            raise bad("dep_q", f"expected 1..n_q ({self.n_q})")
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            raise bad("num_heads", f"must divide dim ({self.dim}) into an even head size")
        if self.depformer_dim % self.depformer_num_heads:
            raise bad("depformer_num_heads", f"must divide depformer_dim ({self.depformer_dim})")
        if len(self.delays) != self.num_codebooks or any(d < 0 for d in self.delays):
            raise bad("delays", f"expected {self.num_codebooks} non-negative delays (text + n_q)")
        if not self.causal:
            raise bad("causal", "only causal models stream")
        if self.context is not None and self.context <= 0:
            raise bad("context", "expected a positive number of steps or null")
        if self.norm not in NORMS:
            raise bad("norm", f"supported: {', '.join(NORMS)}")
        if self.depformer_norm is not None:
            raise bad("depformer_norm", "only null (no per-codebook norm) is supported")
        for key in ("gating", "depformer_gating"):
            if getattr(self, key) not in ACTIVATIONS and getattr(self, key) != "none":
                raise bad(key, f"supported: none, {', '.join(ACTIVATIONS)}")
        if self.depformer_weights_per_step and self.depformer_gating == "none":
            raise bad("depformer_gating", "weights per step need a gated feed-forward")
        if self.positional_embedding not in ("rope", "none"):
            raise bad("positional_embedding", "supported: rope, none")
        if self.depformer_pos_emb not in ("none", "sin"):
            raise bad("depformer_pos_emb", "supported: none, sin")


NORMS = ("rms_norm_f32", "rms_norm", "layer_norm", "layer_norm_f32")
ACTIVATIONS = ("silu", "gelu", "relu", "sigmoid", "tanh")


def gated_hidden_size(dim: int, dim_feedforward: int) -> int:
    """Hidden width of a gated feed-forward, as Kyutai sizes it (keeps parameters near 8 d^2)."""
    if dim_feedforward == 4 * dim:
        return (21 * dim) // 8
    return (2 * dim_feedforward) // 3


def _norm_parameters(norm: str, dim: int) -> int:
    return dim if norm.startswith("rms_norm") else 2 * dim  # a LayerNorm has a bias too


def _layer_parameters(
    dim: int, dim_feedforward: int, norm: str, gating: str, steps: int, layer_scale: float | None
) -> int:
    """Parameters of one TransformerLayer (stages/moshi/transformer.py) with `steps` sets of weights."""
    attention = steps * 4 * dim * dim  # in_proj 3 d^2 + out_proj d^2
    if gating == "none":
        feed_forward = 2 * dim * dim_feedforward  # one ungated feed-forward, whatever the steps
    else:
        feed_forward = steps * 3 * dim * gated_hidden_size(dim, dim_feedforward)
    scales = 2 * dim if layer_scale is not None else 0
    return attention + feed_forward + 2 * _norm_parameters(norm, dim) + scales


# Keys a config.json must give: they set the size of every weight. A default here would quietly build
# another model (ours are the 7B's sizes, the reference's a toy's): a `{}` config was a 7B in float32.
SIZE_KEYS = (
    "dim",
    "num_heads",
    "num_layers",
    "hidden_scale",
    "text_card",
    "card",
    "n_q",
    "dep_q",
    "depformer_dim",
    "depformer_num_heads",
    "depformer_num_layers",
)

# Keys of a Kyutai config.json that describe files or generation defaults, not the LM's shape.
_METADATA_KEYS = {
    "moshi_name",
    "mimi_name",
    "tokenizer_name",
    "mimi_config_name",
    "model_id",
    "lm_gen_config",
    "model_type",
}
# Keys Kyutai's LMModel accepts that we keep only at their "off" value (anything else is an error);
# None: any value passes.
_OFF_VALUES: dict[str, tuple[Any, ...] | None] = {
    "conditioners": (None, {}),
    "fuser": (None, {}),
    "cross_attention": (False, None),
    "kv_repeat": (1, None),
    "demux_second_stream": (False, None),
    "demux_second_text_stream": (False, None),
    "depformer_low_rank_embeddings": (None,),
    "extra_heads_num_heads": (0, None),
    "extra_heads_dim": None,
    "text_card_out": (None,),
    "norm_emb": (False, None),
    "bias_proj": (False, None),
    "lora": (False, None),
    "lora_rank": None,
    "lora_scaling": None,
    "lora_name": (None,),
    "quantize": (False, None),
    "depformer_weights_per_step_schedule": (None,),
    "depformer_causal": None,
    "tts_config": (None, {}),
    "stt_config": (None, {}),
    "same_initial": (False, None),
    "positional_scale": (1.0, 1, None),
    "depformer_positional_scale": (1.0, 1, None),
    "skip_self_attn": (False, None),
    "depformer_kv_repeat": (1, None),
}


def from_kyutai_dict(raw: dict, where: str = "config.json") -> LmConfig:
    """The LmConfig of a Kyutai LM config (the dict of its config.json).

    Raises ConfigError naming the key for unknown keys, unsupported values and wrong types."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    missing = [key for key in SIZE_KEYS if key not in raw]
    if missing:
        raise ConfigError(
            f"{where}: missing key{'s' if len(missing) > 1 else ''} {', '.join(missing)}: "
            "a Moshi LM config.json gives the model's sizes"
        )
    # LmConfig's annotations as written ("int | None", "list[int]"): strings, as this module has
    # `from __future__ import annotations`
    hints = {f.name: str(f.type) for f in dataclasses.fields(LmConfig)}
    # absent, it means what it means to Kyutai's LMModel: hidden_scale x depformer_dim (not our 4224)
    values: dict[str, Any] = {"depformer_dim_feedforward": None}
    for key, value in raw.items():
        if key in _METADATA_KEYS:
            if key == "model_type" and value not in ("moshi", None):
                raise ConfigError(f"{where}: model_type = {value!r}: only moshi models are supported")
            continue
        if key in _OFF_VALUES:
            allowed = _OFF_VALUES[key]
            if allowed is not None and value not in allowed:
                raise ConfigError(
                    f"{where}: {key} = {_short(value)}: not supported by rtpipe's Moshi "
                    f"(supported: {', '.join(map(repr, allowed))})"
                )
            continue
        if key not in hints:
            raise ConfigError(f"{where}: {key}: unknown key for a Moshi LM config")
        values[key] = _check_type(key, value, hints[key], where)
    config = LmConfig(**values)
    config.validate(where)
    return config


def load_config_file(path: str | Path) -> LmConfig:
    """Reads a Kyutai config.json; ConfigError naming the file when it is missing or not JSON."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not a readable JSON config: {e}") from None
    return from_kyutai_dict(raw, str(path))


def _check_type(key: str, value: Any, hint: str, where: str) -> Any:
    """`value` checked against `hint`, an annotation as written; a string hint keeps this simple."""
    optional = "None" in hint
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: {key} = null: a value is required")
    if hint.startswith("list"):
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"{where}: {key} = {_short(value)}: expected a list of integers")
        return list(value)
    if hint.startswith("bool"):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key} = {_short(value)}: expected true or false")
        return value
    if hint.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {key} = {_short(value)}: expected an integer")
        return value
    if hint.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {key} = {_short(value)}: expected a number")
        return float(value)
    if hint.startswith("str"):
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {key} = {_short(value)}: expected a string")
        return value
    return value


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --- built-in sizes -----------------------------------------------------------------------------
# `tiny` is what the default CPU pipeline runs (random weights unless given): the 7B's architecture,
# delays and vocabularies with small dims, so that encode + step + decode fit two cores at 80 ms.
# small/medium/large are the three sizes Kyutai's reference LMGen.step (moshi 0.2.13) was timed at on a
# 2-core CPU: temporal dim 512 / 1024 / 2048 (8 / 16 / 16 layers), depformer 256 / 512 / 1024; about
# 105 M, 444 M and 1.7 B parameters. `rtpipe bench lm` times ours at the same sizes.
def _size(dim, layers, heads, ddim, dlayers, dheads, context=3000) -> LmConfig:
    return LmConfig(
        dim=dim,
        num_layers=layers,
        num_heads=heads,
        depformer_dim=ddim,
        depformer_num_layers=dlayers,
        depformer_num_heads=dheads,
        depformer_dim_feedforward=int(4.125 * ddim),
        context=context,
    )


SIZES: dict[str, LmConfig] = {
    "tiny": _size(256, 4, 4, 128, 2, 4),
    "small": _size(512, 8, 8, 256, 2, 4),
    "medium": _size(1024, 16, 16, 512, 4, 8),
    "large": _size(2048, 16, 16, 1024, 6, 16),
    "7b": LmConfig(),
}


def config_for_size(size: str, where: str = "size") -> LmConfig:
    if size not in SIZES:
        raise ConfigError(f"{where} = {size!r}: unknown size (known: {', '.join(SIZES)})")
    return SIZES[size]
