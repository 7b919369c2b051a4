"""Qwen2 / Qwen2.5 (q/k/v biases) and Qwen3 (QK-norm): import, PTQ export, the engine, fine-tuning.

References are transformers' own Qwen2ForCausalLM / Qwen3ForCausalLM: unquantized for the exact
import, and with fake quantization (weights absmean-ternary per tensor, inputs of every linear
int8 per token, by forward pre-hooks) for the ternary import; the engine is then checked against
the model it was exported from.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from bitnet_train.errors import BitNetError
from bitnet_train.importers import load_hf_llama
from bitnet_train.model import QuantConfig
from bitnet_train.quant import act_quant, weight_quant
from test_importers import assert_logits_match, random_ids, save_tiny_hf_model

NONE = QuantConfig(method="none")
TERNARY = QuantConfig()
FAMILIES = {
    "qwen2-untied": (Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=False)),
    "qwen2-tied": (Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(tie_word_embeddings=False, head_dim=32)),
}


def randomize_biases(hf_model) -> None:
    """HF inits biases to zeros: random ones make a dropped or misplaced bias visible."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


@pytest.fixture(scope="module", params=list(FAMILIES))
def tiny_qwen(request, tmp_path_factory):
    config_cls, model_cls, extra = FAMILIES[request.param]
    directory = tmp_path_factory.mktemp(request.param)
    hf_model = save_tiny_hf_model(directory, config_cls, model_cls, **extra)
    if config_cls is Qwen2Config:
        randomize_biases(hf_model)
        hf_model.save_pretrained(str(directory))
    return request.param, directory, hf_model


def fake_quant_hooks(hf_model) -> list:
    """Make transformers' model compute the b1.58 forward: every linear but lm_head gets its weight
    replaced by codes * s_w and its input by the int8 per-token fake-quantized input."""
    handles = []
    with torch.no_grad():
        for name, m in hf_model.named_modules():
            if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head"):
                codes, s_w = weight_quant(m.weight)
                m.weight.copy_(codes * s_w)
                handles.append(m.register_forward_pre_hook(
                    lambda _m, args: (act_quant(args[0])[0] / act_quant(args[0])[1],)))
    return handles


def test_import_matches_transformers_logits(tiny_qwen):
    family, directory, hf_model = tiny_qwen
    model, _, info = load_hf_llama(directory, quant=NONE)
    assert info["exact"] and info["model_type"] == family.split("-")[0]
    assert model.config.qkv_bias == family.startswith("qwen2")
    assert model.config.qk_norm == (family == "qwen3")
    assert_logits_match(model, hf_model)


def test_ternary_import_matches_fake_quantized_transformers(tiny_qwen):
    family, directory, _ = tiny_qwen
    config_cls, model_cls, _ = FAMILIES[family]
    model, _, _ = load_hf_llama(directory, quant=TERNARY)
    hf_model = model_cls.from_pretrained(str(directory), dtype=torch.float32).eval()
    handles = fake_quant_hooks(hf_model)
    ids = random_ids()
    with torch.no_grad():
        want, got = hf_model(ids).logits, model(ids)
    for h in handles:
        h.remove()
    # fake quantization divides and multiplies where we scale an integer-exact product: rounding
    # order differs, so now and then one activation code flips; the rows stay close.
    err = (got - want).abs().amax(-1) / want.abs().max()
    assert float(err.median()) < 1e-4 and float(err.max()) < 0.05, err
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


@pytest.mark.slow
def test_ptq_export_serves_with_the_models_perplexity_and_greedy_tokens(tiny_qwen, tmp_path):
    from bitnet_train.export.cli import main as export_main
    from bitnet_train.export.reader import open_model
    from bitnet_train.runtime import Engine

    family, directory, _ = tiny_qwen
    out = tmp_path / "m.bitnet"
    assert export_main([str(directory), "-o", str(out), "--ptq", "--dtype", "fp32", "-q"]) == 0
    f = open_model(out)
    assert f.config["qkv_bias"] == family.startswith("qwen2") and f.config["qk_norm"] == (family == "qwen3")
    model, _, _ = load_hf_llama(directory, quant=TERNARY)
    eng = Engine.load(out)

    seq = random_ids(batch=1, seq=48)[0]
    with torch.no_grad():
        ref = torch.log_softmax(model(seq[None])[0].float(), -1).numpy()
    got = eng.forward(seq.numpy())
    got = got - np.log(np.exp(got - got.max(-1, keepdims=True)).sum(-1, keepdims=True)) - got.max(-1, keepdims=True)
    nxt = seq[1:].numpy()
    ppl_ref = math.exp(-ref[np.arange(47), nxt].mean())
    ppl_eng = math.exp(-got[np.arange(47), nxt].mean())
    assert abs(ppl_eng / ppl_ref - 1) < 1e-3, (ppl_eng, ppl_ref)

    prompt = seq[:6]
    ids = prompt[None]
    with torch.no_grad():
        for _ in range(32):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    want = ids[0, 6:].tolist()
    cache = eng.new_cache()
    tok = int(eng.forward(prompt.numpy(), cache=cache, last_only=True).argmax())
    got_tokens = [tok]
    for _ in range(31):
        tok = int(eng.forward([tok], cache=cache, last_only=True).argmax())
        got_tokens.append(tok)
    assert got_tokens == want


def test_a_bias_in_a_family_without_biases_is_named(tmp_path):
    hf = save_tiny_hf_model(tmp_path, LlamaConfig, LlamaForCausalLM)
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "model.safetensors"))
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(hf.config.hidden_size)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(BitNetError, match=r"unexpected \['layers.0.self_attn.q_proj.bias'\]") as e:
        load_hf_llama(tmp_path, quant=NONE)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("config_cls, model_cls, extra, needle", [
    (Qwen3Config, Qwen3ForCausalLM, dict(attention_bias=True), "attention_bias is true.*o_proj"),
    (Qwen2Config, Qwen2ForCausalLM, dict(use_sliding_window=True, sliding_window=16, max_window_layers=0),
     "sliding_window 16 is shorter than max_seq_len 64"),
])
def test_unsupported_qwen_settings_are_one_line_errors(tmp_path, config_cls, model_cls, extra, needle):
    save_tiny_hf_model(tmp_path, config_cls, model_cls, **extra)
    with pytest.raises(BitNetError, match=needle) as e:
        load_hf_llama(tmp_path, quant=NONE)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_qwen3_fine_tune_through_the_recipe_cli_then_serve(tmp_path, verse_corpus):
    from bitnet_train.__main__ import main
    from bitnet_train.export.cli import main as export_main
    from bitnet_train.runtime import Engine

    src = tmp_path / "qwen3"
    save_tiny_hf_model(src, Qwen3Config, Qwen3ForCausalLM, head_dim=32)
    (tmp_path / "corpus").mkdir()
    corpus = verse_corpus(tmp_path / "corpus", docs=3, lines=40, words_per_line=(4, 8))
    run_dir = tmp_path / "run"
    args = {
        "run_dir": run_dir, "logger": "csv", "callbacks.progress_bar": "none", "model.init_from": src,
        "data.source": "files", "data.paths": f"[{corpus}]", "data.tokenizer": "model", "data.val_fraction": 0.2,
        "data.block_size": 16, "data.batch_size": 2, "data.cache_dir": tmp_path / "cache", "trainer.max_steps": 3,
        "trainer.val_check_interval": 3, "trainer.limit_val_batches": 1, "trainer.threads": 1,
        "optim.warmup_steps": 1, "quant.lambda_warmup_steps": 0,
    }
    assert main([f"{k}={v}" for k, v in args.items()]) == 0
    out = tmp_path / "ft.bitnet"
    assert export_main([str(run_dir), "-o", str(out), "-q"]) == 0
    eng = Engine.load(out)
    assert eng.config["qk_norm"] is True
    logits = eng.forward(np.arange(8))
    assert logits.shape == (8, 128) and np.isfinite(logits).all()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2-untied", "qwen3"])
def test_gguf_export_loads_in_transformers_as_the_qwen_architecture(tmp_path, family):
    """--format gguf writes llama.cpp's qwen2 / qwen3 architectures; transformers' GGUF reader (which
    dequantizes TQ2_0 with gguf-py) must compute the fake-quantized forward of the source model.
    (transformers' qwen3 GGUF mapping ignores attention.key_length, so head_dim is its default 128.)"""
    from transformers import AutoModelForCausalLM

    from bitnet_train.export.cli import main as export_main
    from bitnet_train.importers import _gguf_dequantize_option

    config_cls, model_cls, extra = FAMILIES[family]
    shape = dict(hidden_size=256, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1)
    hf = save_tiny_hf_model(tmp_path / "hf", config_cls, model_cls, **{**extra, **shape, "head_dim": 128})
    if config_cls is Qwen2Config:
        randomize_biases(hf)
        hf.save_pretrained(str(tmp_path / "hf"))
    assert export_main([str(tmp_path / "hf"), "-o", str(tmp_path / "m.gguf"), "--ptq", "--format", "gguf",
                        "--dtype", "fp32", "-q"]) == 0
    g = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32,
                                             local_files_only=True, **_gguf_dequantize_option()).eval()
    assert g.config.model_type == family.split("-")[0]
    model, _, _ = load_hf_llama(tmp_path / "hf", quant=TERNARY)
    for name, m in g.named_modules():  # inputs fake-quantized; the weights are already codes * d
        if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head"):
            m.register_forward_pre_hook(lambda _m, args: (act_quant(args[0])[0] / act_quant(args[0])[1],))
    ids = random_ids()
    with torch.no_grad():
        want, got = g(ids).logits, model(ids)
    # TQ2_0 keeps s_w as an fp16 block scale: a 2^-11 relative change of every ternary product
    err = (got - want).abs().amax(-1) / want.abs().max()
    assert float(err.max()) < 0.05 and (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


def test_gguf_refuses_qwen_features_llama_cpp_cannot_represent():
    from bitnet_train.export.gguf_writer import gguf_architecture
    from bitnet_train.export.schema import FormatError

    base = dict(norm="none", ffn="swiglu", tie_embeddings=True, num_heads=4, head_dim=16, hidden_size=64)
    assert gguf_architecture({**base, "qkv_bias": True}) == "qwen2"
    assert gguf_architecture({**base, "qk_norm": True}) == "qwen3"
    for bad in ({"qkv_bias": True, "qk_norm": True}, {"qkv_bias": True, "norm": "subln"}, {"qk_norm": True, "ffn": "relu2"}):
        with pytest.raises(FormatError, match="only in 'qwen2'.*only in 'qwen3'"):
            gguf_architecture({**base, **bad})
