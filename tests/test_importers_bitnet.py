"""HF `bitnet` importer: tiny random checkpoints made with transformers' own classes.

One BitNetForCausalLM (random weights, random norm gains) is saved in each form transformers
loads: master weights quantized online (autobitlinear online), packed with transformers'
pack_weights for linear_class "bitlinear" (weight_scale divided, bf16 as microsoft's 2B4T stores
it) and for "autobitlinear" offline (weight_scale multiplied). The reference is transformers'
forward on the saved directory (from_pretrained, its own BitNet quantization), never our code.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, BitNetConfig, BitNetForCausalLM, PreTrainedTokenizerFast
from transformers.integrations.bitnet import pack_weights, unpack_weights

from bitnet_train.errors import BitNetError
from bitnet_train.importers import load_hf_llama
from bitnet_train.importers_bitnet import should_convert_module, unpack_hf_rows
from bitnet_train.model import QuantConfig
from bitnet_train.quant import weight_quant

VOCAB = 256
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, initializer_range=0.1,
             rope_parameters={"rope_type": "default", "rope_theta": 5000.0}, bos_token_id=1, eos_token_id=2)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
WORDS = ("thou art the king and I the fool of time that speaks in sleep good night sweet prince "
         "my lord the queen doth love thee well enough what light through yonder window breaks").split()
QUANT_CONFIGS = {
    "online": {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online"},
    "bitlinear": {"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline"},
    "autobitlinear": {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "offline"},
}
FORMS = ("online", "bitlinear", "autobitlinear", "online-silu-tied")


@pytest.fixture(autouse=True)
def no_torch_compile():
    # transformers' BitNet quantizers are @torch.compile'd; compiling on a CPU test box is slow.
    with torch._dynamo.config.patch(disable=True):
        yield


def save_tokenizer(directory) -> None:
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(
        str(directory))


def master_model(seed: int = 0, **overrides) -> BitNetForCausalLM:
    torch.manual_seed(seed)
    hf = BitNetForCausalLM(BitNetConfig(**{**SHAPE, **overrides})).eval()
    with torch.no_grad():  # random gains: a mis-placed SubLN or a dropped norm shows in the logits
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return hf


def is_linear(key: str) -> bool:
    return key.endswith(".weight") and key.split(".")[-2] in LINEARS


def write_checkpoint(directory, hf: BitNetForCausalLM, form: str) -> None:
    """form: "master" (no quantization_config, as save_pretrained writes it), "online", "bitlinear",
    "autobitlinear" (packed by transformers' pack_weights from our absmean codes)."""
    hf.save_pretrained(str(directory))
    save_tokenizer(directory)
    cfg = json.loads((directory / "config.json").read_text())
    if form != "master":
        cfg["quantization_config"] = dict(QUANT_CONFIGS[form])
    (directory / "config.json").write_text(json.dumps(cfg))
    if form in ("bitlinear", "autobitlinear"):
        state = {}
        for key, w in load_file(str(directory / "model.safetensors")).items():
            if is_linear(key):
                codes, s = weight_quant(w)
                state[key] = pack_weights(codes.long())
                # bitlinear: y = acc / (s_x * weight_scale), stored bf16 like microsoft's; autobitlinear: * weight_scale
                state[f"{key}_scale"] = (1 / s).reshape(1).to(torch.bfloat16) if form == "bitlinear" else s.reshape(1)
            else:
                state[key] = w.to(torch.bfloat16) if form == "bitlinear" else w
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})


def transformers_reference(directory):
    return AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """form -> (directory, transformers' model loaded from it)."""
    out = {}
    for form in FORMS:
        directory = tmp_path_factory.mktemp(form)
        if form == "online-silu-tied":
            write_checkpoint(directory, master_model(1, hidden_act="silu", tie_word_embeddings=True), "online")
        else:
            write_checkpoint(directory, master_model(), form)
        out[form] = directory, transformers_reference(directory)
    return out


def ids(batch=2, seq=17, seed=2):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def assert_logits_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """The same math in another op order: an activation on a rounding boundary may take the other
    int8 code, so allow a rare small deviation but require most logits to agree to fp32 noise."""
    diff = (got - want).abs()
    assert diff.median() < 1e-5 and diff.max() < 0.02 * want.abs().max(), (float(diff.max()), float(diff.median()))


# --- mappings, each against transformers ------------------------------------------------------------


def test_packed_rows_unpack_as_transformers_packs_them():
    from bitnet_train.export.hf_writer import pack_hf_rows

    codes = torch.randint(-1, 2, (12, 7), generator=torch.Generator().manual_seed(0))
    packed = pack_weights(codes.clone())  # stored row r, bits 2i..2i+1: row r + i*out/4
    assert packed.shape == (3, 7) and packed.dtype == torch.uint8
    assert torch.equal(unpack_hf_rows(packed), codes.to(torch.int8))
    assert torch.equal(unpack_weights(packed, torch.int8), unpack_hf_rows(packed))
    assert torch.equal(torch.from_numpy(pack_hf_rows(codes.numpy())), packed)  # our --format hf writes the same


def test_modules_to_not_convert_follow_transformers_rules():
    from transformers.quantizers.quantizers_utils import should_convert_module as theirs

    patterns = ["lm_head", "model.layers.1", "model.layers.*.mlp.down_proj", "up_proj", "mlp.gate"]
    for layer in (0, 1, 11):
        for sub in ("self_attn.q_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            name = f"model.layers.{layer}.{sub}"
            assert should_convert_module(name, patterns) == theirs(name, patterns), name
    assert not should_convert_module("lm_head", patterns)


@pytest.mark.parametrize("form", FORMS)
def test_import_computes_transformers_forward(checkpoints, form):
    directory, reference = checkpoints[form]
    model, tokenizer, info = load_hf_llama(directory, quant=QuantConfig())
    cfg = model.config
    assert (cfg.norm, cfg.ffn) == ("subln", "swiglu" if "silu" in form else "relu2")
    assert cfg.tie_embeddings == ("tied" in form) and (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (4, 2, 16)
    assert cfg.rope_theta == 5000.0 and cfg.rms_norm_eps == 1e-5
    assert all(m.quantize for m in model.bitlinear_modules().values())
    assert info["exact"] and info["model_type"] == "bitnet" and not info["subln_added"]
    with torch.no_grad():
        assert_logits_close(model(ids()), reference(ids()).logits)
    assert tokenizer.eos_token == "</s>"


@pytest.mark.parametrize("form", ["bitlinear", "autobitlinear"])
def test_packed_codes_and_scale_come_back_from_our_quantizer(checkpoints, form):
    """Divide (bitlinear: s_w = 1 / weight_scale) vs multiply (autobitlinear: s_w = weight_scale), and
    ternary_master_weight: our absmean quantizer finds the stored codes exactly and s_w to an ulp."""
    directory, _ = checkpoints[form]
    stored = load_file(str(directory / "model.safetensors"))
    model, _, _ = load_hf_llama(directory, quant=QuantConfig())
    for name, m in model.bitlinear_modules().items():
        codes, s_w = m.quantized_weight()
        assert torch.equal(codes, unpack_weights(stored[f"model.{name}.weight"], torch.int8)), name
        ws = stored[f"model.{name}.weight_scale"].double()
        want = (1 / ws if form == "bitlinear" else ws).float().reshape(())
        torch.testing.assert_close(s_w, want, rtol=2.5e-7, atol=0)


def test_online_master_weights_are_our_latent_weights(checkpoints):
    directory, _ = checkpoints["online"]
    stored = load_file(str(directory / "model.safetensors"))
    model, _, info = load_hf_llama(directory, quant=QuantConfig())
    assert info["quantization"] == "autobitlinear online"
    for name, m in model.bitlinear_modules().items():
        assert torch.equal(m.weight.detach(), stored[f"model.{name}.weight"].float()), name
    # the SubLN gains are the checkpoint's (not calibrated, not ones)
    for key in ("layers.0.self_attn.attn_sub_norm.weight", "layers.1.mlp.ffn_sub_norm.weight"):
        assert torch.equal(model.state_dict()[key], stored[f"model.{key}"])


def test_master_weights_without_quantization_config_import_as_online(tmp_path, checkpoints):
    """save_pretrained of a plain BitNetForCausalLM writes no quantization_config, and transformers then
    runs the weights unquantized; a BitNet's function is the ternary one, so that is what we import."""
    write_checkpoint(tmp_path, master_model(), "master")
    model, _, info = load_hf_llama(tmp_path, quant=QuantConfig())
    assert not info["exact"] and "no quantization_config" in info["quantization"]
    with torch.no_grad():
        assert_logits_close(model(ids()), checkpoints["online"][1](ids()).logits)


def test_a_config_spelled_as_microsofts_2b4t_bf16_imports(tmp_path, checkpoints):
    """Its config.json has the legacy rope_theta and torch_dtype keys and an auto_map (remote code
    we never run: transformers' own BitNetConfig reads it)."""
    d = edited(tmp_path, checkpoints["online"][0], config=lambda c: c.update(
        rope_theta=c.pop("rope_parameters")["rope_theta"], torch_dtype=c.pop("dtype", "float32"),
        auto_map={"AutoConfig": "configuration_bitnet.BitNetConfig",
                  "AutoModelForCausalLM": "modeling_bitnet.BitNetForCausalLM"}))
    model, _, info = load_hf_llama(d, quant=QuantConfig())
    assert model.config.rope_theta == 5000.0 and info["exact"]
    with torch.no_grad():
        assert_logits_close(model(ids()), checkpoints["online"][1](ids()).logits)


def test_quant_none_import_keeps_the_dequantized_ternary_weights(checkpoints):
    directory, _ = checkpoints["autobitlinear"]
    stored = load_file(str(directory / "model.safetensors"))
    model, _, info = load_hf_llama(directory, quant=QuantConfig(method="none"))
    w = model.layers[0].mlp.down_proj.weight.detach()
    codes = unpack_weights(stored["model.layers.0.mlp.down_proj.weight"], torch.float32)
    assert torch.equal(w, codes * stored["model.layers.0.mlp.down_proj.weight_scale"].float())
    assert not info["exact"]


# --- export and our runtime ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("form", FORMS[:3])
def test_bitnet_export_without_ptq_runs_in_our_engine_like_transformers(tmp_path, checkpoints, form):
    """bitnet-export DIR -o m.bitnet (no --ptq: it is already ternary) -> the C++ engine: perplexity within
    0.1% of transformers' and 32 greedy tokens identical."""
    from bitnet_train.export.cli import main
    from bitnet_train.export.reader import open_model
    from bitnet_train.runtime import Engine, Generator
    from bitnet_train.runtime.evaluate import perplexity

    directory, reference = checkpoints[form]
    out = tmp_path / "m.bitnet"
    assert main([str(directory), "-o", str(out), "--dtype", "fp32", "-q"]) == 0
    f = open_model(out)
    assert f.config["norm"] == "subln" and f.config["ffn"] == "relu2" and len(f.ternary_layers()) == 14
    assert f.provenance["source_kind"] == "hf" and f.provenance["ptq"] is False
    eng = Engine.load(out, threads=1)

    stream = ids(1, 64, seed=5)[0]
    with torch.no_grad():
        logp = reference(stream[None]).logits[0, :-1].double().log_softmax(-1)
    want_ppl = math.exp(-float(logp[torch.arange(63), stream[1:]].mean()))
    got = perplexity(eng, stream.numpy())
    assert got.tokens == 63 and abs(got.ppl / want_ppl - 1) < 1e-3, (got.ppl, want_ppl)

    prompt = stream[:8].tolist()
    seq = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(32):
            seq = torch.cat([seq, reference(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    completion = Generator(eng).generate(prompt, max_new_tokens=32, ignore_eos=True)[0]
    assert completion.token_ids == seq[0, 8:].tolist()


@pytest.mark.slow
def test_fine_tune_from_a_bitnet_directory_through_the_recipe_cli(tmp_path, checkpoints, capsys, monkeypatch,
                                                                  verse_corpus):
    from bitnet_train.__main__ import main
    from bitnet_train.model_dir import load_model_dir

    directory, _ = checkpoints["bitlinear"]
    (tmp_path / "corpus").mkdir()
    corpus = verse_corpus(tmp_path / "corpus", docs=3, lines=40)
    run_dir = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BITNET_RUN_DIR", raising=False)
    overrides = {
        "recipe": "shakespeare_tiny", "model": "hf", "model.init_from": str(directory), "data.tokenizer": "model",
        "data.source": "files", "data.paths": f"[{corpus}]", "data.val_fraction": 0.34, "data.block_size": 32,
        "data.batch_size": 2, "data.cache_dir": str(tmp_path / "cache"), "trainer.max_steps": 2,
        "trainer.val_check_interval": 2, "trainer.limit_val_batches": 1, "trainer.threads": 1,
        "callbacks.checkpoint_every_n_steps": 2, "callbacks.progress_bar": "none", "optim.warmup_steps": 1,
        "logger": "csv", "run_dir": str(run_dir), "sample_prompt": "null",
    }
    code = main([f"{k}={v}" for k, v in overrides.items()])
    assert code == 0, capsys.readouterr().err[-3000:]
    model, _, meta = load_model_dir(run_dir / "model")
    assert (model.config.norm, model.config.ffn, model.config.vocab_size) == ("subln", "relu2", VOCAB)
    prov = meta["provenance"]
    assert prov["model_type"] == "bitnet" and prov["quantization"] == "bitlinear offline" and prov["step"] == 2
    assert "subln_calibration" not in prov  # the checkpoint's own SubLN gains are kept


# --- bad input: one line naming the key or tensor -------------------------------------------------------


def edited(tmp_path, source, config=None, state=None):
    """A copy of the checkpoint `source` with config.json and/or the tensors changed by callbacks."""
    shutil.copytree(source, tmp_path / "bad")
    d = tmp_path / "bad"
    if config:
        cfg = json.loads((d / "config.json").read_text())
        config(cfg)
        (d / "config.json").write_text(json.dumps(cfg))
    if state:
        tensors = load_file(str(d / "model.safetensors"))
        state(tensors)
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def expect_error(directory, needle, **kwargs):
    with pytest.raises(BitNetError) as e:
        load_hf_llama(directory, **{"quant": QuantConfig(), **kwargs})
    msg = str(e.value)
    assert needle in msg and "\n" not in msg, msg


def test_unsupported_model_type_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64, "n_layer": 2}))
    expect_error(tmp_path, "model_type 'gpt2'")
    with pytest.raises(BitNetError, match="bitnet"):  # the message lists what is supported
        load_hf_llama(tmp_path, quant=QuantConfig())
    mistral = {"model_type": "mistral", "quantization_config": QUANT_CONFIGS["online"]}
    (tmp_path / "config.json").write_text(json.dumps(mistral))
    expect_error(tmp_path, "model_type 'mistral' with a bitnet quantization_config")


def test_missing_weight_scale_is_named(tmp_path, checkpoints):
    d = edited(tmp_path, checkpoints["bitlinear"][0], state=lambda t: t.pop("model.layers.1.mlp.up_proj.weight_scale"))
    expect_error(d, "tensor model.layers.1.mlp.up_proj.weight_scale is missing")


def test_packed_shape_that_disagrees_with_the_config_is_named(tmp_path, checkpoints):
    d = edited(tmp_path, checkpoints["autobitlinear"][0], config=lambda c: c.update(intermediate_size=192))
    expect_error(d, "tensor model.layers.0.mlp.gate_proj.weight: packed shape (32, 64) disagrees with the "
                    "config's (192, 64)")


def test_a_bias_tensor_is_refused_by_name(tmp_path, checkpoints):
    d = edited(tmp_path, checkpoints["bitlinear"][0],
               state=lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64, dtype=torch.bfloat16)}))
    expect_error(d, "tensor model.layers.0.self_attn.q_proj.bias: a BitNet checkpoint has no biases")
    d = edited(tmp_path / "b", checkpoints["online"][0], config=lambda c: c.update(attention_bias=True))
    expect_error(d, "attention_bias is true")


@pytest.mark.parametrize("key,value", [("linear_class", "ternarylinear"), ("quantization_mode", "later")])
def test_unknown_linear_class_or_quantization_mode_is_named(tmp_path, checkpoints, key, value):
    d = edited(tmp_path, checkpoints["bitlinear"][0], config=lambda c: c["quantization_config"].update({key: value}))
    expect_error(d, f"quantization_config.{key} {value!r} is unknown")


@pytest.mark.parametrize("patch,needle", [
    ({"use_rms_norm": True}, "use_rms_norm is true on a bitnet model"),
    ({"modules_to_not_convert": ["model.layers.0.mlp.down_proj"]}, "modules_to_not_convert does not list lm_head"),
    ({"quant_method": "gptq"}, "quantization_config.quant_method is 'gptq'"),
    ({"modules_to_not_convert": ["lm_head", "model.layers.(0"]}, "entry 'model.layers.(0' is not a valid pattern"),
])
def test_quantization_configs_that_do_not_map_are_refused(tmp_path, checkpoints, patch, needle):
    d = edited(tmp_path, checkpoints["online"][0], config=lambda c: c["quantization_config"].update(patch))
    expect_error(d, needle)


def test_stray_or_bad_tensors_are_named(tmp_path, checkpoints):
    src = checkpoints["autobitlinear"][0]

    def three(t):  # the unused 2-bit value 3 in one packed byte
        t["model.layers.0.self_attn.k_proj.weight"][0, 0] = 0xFF

    expect_error(edited(tmp_path / "a", src, state=three),
                 "model.layers.0.self_attn.k_proj.weight: holds the 2-bit value 3")
    negative = {"model.layers.0.mlp.down_proj.weight_scale": torch.tensor([-1.0])}
    d = edited(tmp_path / "b", src, state=lambda t: t.update(negative))
    expect_error(d, "tensor model.layers.0.mlp.down_proj.weight_scale: the weight scale must be finite and positive")
    d = edited(tmp_path / "c", checkpoints["online"][0],
               state=lambda t: t.update({"model.layers.0.mlp.down_proj.weight_scale": torch.tensor([1.0])}))
    expect_error(d, "tensor model.layers.0.mlp.down_proj.weight_scale is unexpected: master weights")


def test_a_norm_other_than_the_checkpoints_is_refused(checkpoints):
    expect_error(checkpoints["online"][0], "the checkpoint's norm is 'subln'", norm="none")
