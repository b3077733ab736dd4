"""What a Hugging Face checkpoint's config.json says about the model, in one frozen object.

tpserve serves two forward-pass shapes:

* the Llama family -- ``llama`` (Llama 2/3, SmolLM2), ``mistral``, ``qwen2`` (QKV bias) and
  ``phi3`` (fused ``qkv_proj`` / ``gate_up_proj`` tensors): RMSNorm, rotary positions, grouped-query
  attention, a gated SiLU MLP;
* ``gpt2``: LayerNorm, learned positions, multi-head attention, GELU MLP, Conv1D weights stored
  as (in, out).

`ModelConfig.from_hf(config_dict)` normalises both transformers-4 style keys (``rope_theta``,
``rope_scaling``) and transformers-5 style ones (``rope_parameters``). Anything the forward pass
does not implement is refused here with a message naming the key, never silently ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

LLAMA_FAMILY = ("llama", "mistral", "qwen2", "phi3")
SUPPORTED = LLAMA_FAMILY + ("gpt2",)


class UnsupportedModel(ValueError):
    """The checkpoint uses an architecture or option the forward pass does not implement."""


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    kind: str = "default"  # "default" | "linear" | "llama3"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    act: str  # "silu" | "gelu_tanh" | "gelu"
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    tie_embeddings: bool
    max_positions: int
    rope: RopeConfig | None  # None: learned absolute positions (gpt2)
    sliding_windows: tuple[int | None, ...]  # per layer; None = full attention
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    checkpoint_dtype: str

    @property
    def family(self) -> str:
        return "gpt2" if self.model_type == "gpt2" else "llama"

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        return cls.from_hf(json.loads((Path(path) / "config.json").read_text()))

    @classmethod
    def from_hf(cls, c: dict) -> "ModelConfig":
        model_type = c.get("model_type")
        if model_type not in SUPPORTED:
            raise UnsupportedModel(
                f"model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED)})"
            )
        return _from_gpt2(c) if model_type == "gpt2" else _from_llama_family(c)


def _eos_ids(c: dict) -> tuple[int, ...]:
    eos = c.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _dtype(c: dict) -> str:
    return str(c.get("torch_dtype") or c.get("dtype") or "float32")


def _from_llama_family(c: dict) -> ModelConfig:
    model_type = c["model_type"]
    heads = c["num_attention_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    if c.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModel("partial_rotary_factor != 1 is not supported")
    act = c.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModel(f"hidden_act {act!r} is not supported for {model_type} (only 'silu')")
    num_layers = c["num_hidden_layers"]
    qkv_bias = bool(c.get("attention_bias", False)) or model_type == "qwen2"
    return ModelConfig(
        model_type=model_type,
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=c.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        intermediate_size=c["intermediate_size"],
        norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        act="silu",
        qkv_bias=qkv_bias,
        o_bias=bool(c.get("attention_bias", False)) and model_type == "llama",
        mlp_bias=bool(c.get("mlp_bias", False)),
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        max_positions=c.get("max_position_embeddings", 2048),
        rope=_rope(c),
        sliding_windows=_sliding_windows(c, num_layers),
        bos_token_id=c.get("bos_token_id"),
        eos_token_ids=_eos_ids(c),
        checkpoint_dtype=_dtype(c),
    )


def _rope(c: dict) -> RopeConfig:
    # transformers 5 folds theta and scaling into `rope_parameters`; 4.x keeps them apart.
    params = dict(c.get("rope_parameters") or {})
    scaling = c.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = float(params.get("rope_theta", c.get("rope_theta", 10000.0)))
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind == "default":
        return RopeConfig(theta=theta)
    if kind == "linear":
        return RopeConfig(theta=theta, kind="linear", factor=float(params["factor"]))
    if kind == "llama3":
        return RopeConfig(
            theta=theta,
            kind="llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_positions=int(params["original_max_position_embeddings"]),
        )
    raise UnsupportedModel(f"rope type {kind!r} is not supported (default, linear, llama3)")


def _sliding_windows(c: dict, num_layers: int) -> tuple[int | None, ...]:
    window = c.get("sliding_window")
    layer_types = c.get("layer_types")
    if c["model_type"] == "qwen2" and not c.get("use_sliding_window", False):
        window = None
    if layer_types:  # transformers 5 names each layer's attention kind
        return tuple(window if t == "sliding_attention" and window else None for t in layer_types)
    if c["model_type"] == "qwen2" and window:
        first = c.get("max_window_layers", num_layers)
        return tuple(window if i >= first else None for i in range(num_layers))
    if c["model_type"] == "mistral" and window:
        return (int(window),) * num_layers
    return (None,) * num_layers


def _from_gpt2(c: dict) -> ModelConfig:
    hidden = c["n_embd"]
    heads = c["n_head"]
    for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if c.get(key):
            raise UnsupportedModel(f"gpt2 option {key}=true is not supported")
    if not c.get("scale_attn_weights", True):
        raise UnsupportedModel("gpt2 option scale_attn_weights=false is not supported")
    act = c.get("activation_function", "gelu_new")
    acts = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
    if act not in acts:
        raise UnsupportedModel(f"gpt2 activation_function {act!r} is not supported")
    return ModelConfig(
        model_type="gpt2",
        vocab_size=c["vocab_size"],
        hidden_size=hidden,
        num_layers=c["n_layer"],
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=c.get("n_inner") or 4 * hidden,
        norm_eps=float(c.get("layer_norm_epsilon", 1e-5)),
        act=acts[act],
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        tie_embeddings=bool(c.get("tie_word_embeddings", True)),
        max_positions=c["n_positions"],
        rope=None,
        sliding_windows=(None,) * c["n_layer"],
        bos_token_id=c.get("bos_token_id"),
        eos_token_ids=_eos_ids(c),
        checkpoint_dtype=_dtype(c),
    )
