"""bitnet_train.gguf_import: llama.cpp ternary GGUFs (TQ1_0 / TQ2_0) -> BitNetModel -> .bitnet.

The GGUFs are written here with gguf-py (GGUFWriter + gguf.quants), in the tensor order llama.cpp
reads (q/k rows of the `llama` arch in its interleaved-RoPE order). The reference forward is built
independently from each file: gguf-py's dequantize and llama.cpp's graphs (src/models/llama.cpp,
bitnet.cpp) written out in torch below, with or without our int8 activation quantization. For the
`llama` arch the reference itself is checked against transformers' LlamaForCausalLM.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize, quantize  # noqa: E402

from bitnet_train.errors import BitNetError, CheckpointError  # noqa: E402
from bitnet_train.export.cli import main  # noqa: E402
from bitnet_train.export.gguf_writer import add_tokenizer  # noqa: E402
from bitnet_train.export.reader import open_model  # noqa: E402
from bitnet_train.gguf_import import GGML_TYPES, GGUFFile, dense_tensor, load_ternary_gguf  # noqa: E402
from bitnet_train.model import BitNetModel, ModelConfig, QuantConfig  # noqa: E402
from bitnet_train.model_dir import save_model_dir  # noqa: E402
from bitnet_train.quant import ternary_master_weight, weight_quant  # noqa: E402

Q = gguf.GGMLQuantizationType
TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 8
CHAT = "{% for m in messages %}<|user|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
DIMS = dict(hidden=256, ffn=512, n_head=4, n_kv=2, n_layer=2, ctx=64)
# The scale our quantizer finds in ternary_master_weight's latent weights: the file's to 2 float32 ulps
# (its fp32 mean moves in steps of up to 2 ulps of the target on some shapes, e.g. 256 x 512).
SCALE_RTOL = 2 ** -22
EMBED_STD = 0.03


@pytest.fixture(scope="module")
def tok():
    from bitnet_train.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer([TEXT], vocab_size=300, cache_dir=None)


# ---- writing GGUFs with gguf-py ---------------------------------------------------------------

def write_gguf(path: Path, arch: str, qtype, tok, *, seed=0, relu2=False, dense_linears=(), scale_tensors=None,
               override=None, hidden=256, ffn=512, n_head=4, n_kv=2, n_layer=2, ctx=64, extra_kv=None) -> Path:
    """A tiny GGUF as llama.cpp reads it. Ternary linears: random codes * one scale per tensor, so
    every block's d is that scale. dense_linears: {gguf name: Q.F16 | Q.Q8_0}; scale_tensors: {gguf
    linear name: factor}; override: {tensor name: (array, raw_dtype)} replaces what would be written."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(ctx)
    w.add_embedding_length(hidden)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(ffn)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    if relu2:
        w.add_string(f"{arch}.hidden_activation", "relu2")
    for k, v in (extra_kv or {}).items():
        w.add_string(k, v) if isinstance(v, str) else w.add_uint32(k, v)
    vocab = len(tok)
    tc = {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "chat_template": CHAT}
    add_tokenizer(w, SimpleNamespace(tokenizer_json=tok.backend_tokenizer.to_str(), tokenizer_config=tc,
                                     config={"vocab_size": vocab}), [])
    dense_linears, scale_tensors, override = dict(dense_linears), dict(scale_tensors or {}), dict(override or {})
    hd = hidden // n_head

    def add(name, array, raw_dtype=None):
        array, raw_dtype = override.pop(name, (array, raw_dtype))
        w.add_tensor(name, array, raw_dtype=raw_dtype)

    # logits of about unit scale (logits = final norm @ token_embd^T for bitnet): a random model this small is
    # chaotic, and larger logits magnify what one int8 rounding flip does to the perplexity
    add("token_embd.weight", (rng.standard_normal((vocab, hidden)) * EMBED_STD).astype(np.float16))
    for i in range(n_layer):
        shapes = {"attn_q": (n_head * hd, hidden), "attn_k": (n_kv * hd, hidden), "attn_v": (n_kv * hd, hidden),
                  "attn_output": (hidden, n_head * hd), "ffn_gate": (ffn, hidden), "ffn_up": (ffn, hidden),
                  "ffn_down": (hidden, ffn)}
        norms = {"attn_norm": hidden, "ffn_norm": hidden}
        if arch == "bitnet":
            norms.update({"attn_sub_norm": n_head * hd, "ffn_sub_norm": ffn})
        for n, size in norms.items():
            add(f"blk.{i}.{n}.weight", rng.uniform(0.5, 1.5, size).astype(np.float32))
        for n, shape in shapes.items():
            name = f"blk.{i}.{n}.weight"
            kind = dense_linears.get(name, qtype)
            if kind == Q.F16:
                add(name, (rng.standard_normal(shape) / math.sqrt(shape[1])).astype(np.float16))
            elif kind == Q.Q8_0:
                w8 = (rng.standard_normal(shape) / math.sqrt(shape[1])).astype(np.float32)
                add(name, quantize(w8, Q.Q8_0), Q.Q8_0)
            else:
                scale = rng.uniform(0.5, 1.5) / math.sqrt(shape[1])
                add(name, quantize(rng.integers(-1, 2, shape).astype(np.float32) * np.float32(scale), kind), kind)
            if name in scale_tensors:
                add(f"blk.{i}.{n}.scale", np.array([scale_tensors[name]], dtype=np.float32))
    add("output_norm.weight", rng.uniform(0.5, 1.5, hidden).astype(np.float32))
    if arch == "llama":
        add("output.weight", quantize((rng.standard_normal((vocab, hidden)) * EMBED_STD).astype(np.float32),
                                      Q.Q8_0), Q.Q8_0)
    for name, (array, raw_dtype) in override.items():  # tensors that were not written above
        w.add_tensor(name, array, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---- the reference forward: llama.cpp's graphs over gguf-py's dequantized weights --------------

def field(r, key, default=None):
    if key not in r.fields:
        return default
    f = r.fields[key]
    v = f.parts[f.data[0]]
    return bytes(v).decode() if f.types[0] == gguf.GGUFValueType.STRING else v.tolist()[0]


class Reference:
    """llama: interleaved RoPE (ROPE_TYPE_NORM), SwiGLU, output or token_embd.  bitnet: NEOX RoPE,
    attn_sub_norm / ffn_sub_norm, logits from token_embd, `.scale` tensors multiplying the product.
    act_quant: the input of every TQ linear is quantized per token to int8 (our contract)."""

    def __init__(self, path, act_quant=True):
        r = gguf.GGUFReader(str(path))
        self.W, self.types = {}, {}
        for t in r.tensors:
            shape = tuple(int(x) for x in reversed(t.shape))
            self.W[t.name] = torch.from_numpy(dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32))
            self.types[t.name] = t.tensor_type
        self.arch = a = field(r, "general.architecture")
        self.n_layer, self.n_head = field(r, f"{a}.block_count"), field(r, f"{a}.attention.head_count")
        self.n_kv = field(r, f"{a}.attention.head_count_kv")
        self.hd = field(r, f"{a}.embedding_length") // self.n_head
        self.eps, self.base = field(r, f"{a}.attention.layer_norm_rms_epsilon"), field(r, f"{a}.rope.freq_base")
        self.relu2 = field(r, f"{a}.hidden_activation") == "relu2"
        self.max_seq_len = field(r, f"{a}.context_length")
        self.vocab_size = self.W["token_embd.weight"].shape[0]
        self.act_quant = act_quant

    def norm(self, x, name):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.W[name]

    def lin(self, x, name):
        if self.act_quant and self.types[f"{name}.weight"] in (Q.TQ1_0, Q.TQ2_0):
            s = torch.full_like(x[..., :1], 127.0) / x.abs().amax(-1, keepdim=True).clamp(min=1e-5)
            x = (x * s).round().clamp(-128, 127) / s
        y = x @ self.W[f"{name}.weight"].T
        return y * self.W[f"{name}.scale"].reshape(()) if f"{name}.scale" in self.W else y

    def rope(self, x, T):  # x: (T, heads, hd)
        inv = self.base ** (-torch.arange(0, self.hd, 2, dtype=torch.float64) / self.hd)
        ang = torch.arange(T, dtype=torch.float64)[:, None] * inv  # (T, hd/2)
        cos, sin = ang.cos().float()[:, None], ang.sin().float()[:, None]
        if self.arch == "llama":  # rotates pairs (2i, 2i + 1)
            a, b = x[..., 0::2], x[..., 1::2]
            return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).reshape(x.shape)
        a, b = x[..., : self.hd // 2], x[..., self.hd // 2:]  # NEOX: pairs (i, i + hd/2)
        return torch.cat([a * cos - b * sin, a * sin + b * cos], -1)

    @torch.no_grad()
    def forward(self, ids) -> np.ndarray:
        ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
        T = len(ids)
        x = self.W["token_embd.weight"][ids]
        mask = torch.ones(T, T, dtype=torch.bool).triu(1)
        for i in range(self.n_layer):
            b = f"blk.{i}"
            h = self.norm(x, f"{b}.attn_norm.weight")
            q = self.rope(self.lin(h, f"{b}.attn_q").view(T, self.n_head, self.hd), T)
            k = self.rope(self.lin(h, f"{b}.attn_k").view(T, self.n_kv, self.hd), T)
            v = self.lin(h, f"{b}.attn_v").view(T, self.n_kv, self.hd)
            rep = self.n_head // self.n_kv  # q head j reads kv head j // rep (ggml's broadcast)
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            att = torch.einsum("thd,shd->hts", q, k) / math.sqrt(self.hd)
            att = att.masked_fill(mask, float("-inf")).softmax(-1)
            o = torch.einsum("hts,shd->thd", att, v).reshape(T, self.n_head * self.hd)
            if self.arch == "bitnet":
                o = self.norm(o, f"{b}.attn_sub_norm.weight")
            x = x + self.lin(o, f"{b}.attn_output")
            h = self.norm(x, f"{b}.ffn_norm.weight")
            g = self.lin(h, f"{b}.ffn_gate")
            g = torch.relu(g).square() if self.relu2 else torch.nn.functional.silu(g)
            m = g * self.lin(h, f"{b}.ffn_up")
            if self.arch == "bitnet":
                m = self.norm(m, f"{b}.ffn_sub_norm.weight")
            x = x + self.lin(m, f"{b}.ffn_down")
        x = self.norm(x, "output_norm.weight")
        return (x @ self.W.get("output.weight", self.W["token_embd.weight"]).T).numpy()


def assert_close(a: np.ndarray, b: np.ndarray, what: str):
    """As tests/runtime/test_engine_parity.py: most rows to float rounding, every row within a few
    int8 rounding flips of an activation (summation orders differ)."""
    scale = float(np.abs(b).max())
    row_err = np.abs(a - b).max(-1) / scale
    assert row_err.max() <= 0.05, f"{what}: max |diff| {row_err.max():.3g} of the logit scale {scale:.3g}"
    assert np.median(row_err) <= 1e-4, f"{what}: median row error {np.median(row_err):.3g}"
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.9, f"{what}: argmax disagrees"


def float_twin(model: BitNetModel) -> BitNetModel:
    """The imported model with each ternary linear replaced by its float weights codes * s_w and no
    activation quantization: what the float reference computes."""
    twin = BitNetModel(model.config, QuantConfig(method="none"))
    state = model.state_dict()
    for name, m in model.bitlinear_modules().items():
        if m.quantize:
            codes, s_w = m.quantized_weight()
            state[f"{name}.weight"] = codes.float() * s_w
    twin.load_state_dict(state)
    return twin.eval()


CASES = {  # arch, qtype, writer options
    "llama-TQ2_0": ("llama", Q.TQ2_0, dict(dense_linears={"blk.1.ffn_down.weight": Q.Q8_0})),
    "llama-TQ1_0": ("llama", Q.TQ1_0, dict(dense_linears={"blk.0.attn_v.weight": Q.F16})),
    "bitnet-TQ2_0": ("bitnet", Q.TQ2_0, dict(dense_linears={"blk.0.attn_v.weight": Q.F16},
                                           scale_tensors={"blk.0.attn_q.weight": 1.25, "blk.1.ffn_down.weight": 0.5})),
    "bitnet-TQ1_0-relu2": ("bitnet", Q.TQ1_0, dict(relu2=True, scale_tensors={"blk.1.ffn_up.weight": 2.0})),
}


def ids_of(tok, n=40):
    return np.array(tok.encode(TEXT, add_special_tokens=False)[:n], dtype=np.int64)


# ---- decoders and the parser ------------------------------------------------------------------

def test_decoders_match_gguf_py_on_random_blocks(tmp_path):
    """Every byte pattern (TQ2_0's digit 3 included: llama.cpp reads it as 2*d) decodes as gguf-py does."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(tmp_path / "r.gguf"), "llama")
    blocks = {Q.TQ1_0: 54, Q.TQ2_0: 66, Q.Q8_0: 34, Q.F16: 2, Q.BF16: 2, Q.F32: 4}
    for qt, size in blocks.items():
        per_row = 512 // gguf.GGML_QUANT_SIZES[qt][0] * size
        raw = rng.integers(0, 256, (3, per_row), dtype=np.uint8)
        if qt in (Q.TQ1_0, Q.TQ2_0, Q.Q8_0):  # finite fp16 block scales: last two bytes (TQ), first two (Q8_0)
            byte_at = np.arange(per_row).reshape(-1, size)
            d_at = byte_at[:, :2] if qt == Q.Q8_0 else byte_at[:, -2:]
            raw[:, d_at.reshape(-1)] = rng.uniform(-2, 2, (3, d_at.shape[0])).astype(np.float16).view(np.uint8)
        elif qt != Q.BF16:
            values = rng.standard_normal((3, per_row // size))
            raw = values.astype(np.float32 if qt == Q.F32 else np.float16).view(np.uint8)
        w.add_tensor(qt.name, raw, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f = GGUFFile(tmp_path / "r.gguf")
    for type_id, (name, block, size) in GGML_TYPES.items():  # our layout table is gguf-py's
        assert Q(type_id).name == name and gguf.GGML_QUANT_SIZES[Q(type_id)] == (block, size)
    for t in gguf.GGUFReader(str(tmp_path / "r.gguf")).tensors:
        want = dequantize(t.data, t.tensor_type).reshape(3, 512)
        np.testing.assert_array_equal(dense_tensor(f, t.name), want, err_msg=t.name)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_import_matches_the_reference_forward(tmp_path, tok, case):
    arch, qtype, opts = CASES[case]
    path = write_gguf(tmp_path / "m.gguf", arch, qtype, tok, **opts)
    model, tokenizer, info = load_ternary_gguf(path)
    cfg = model.config
    assert (cfg.norm, cfg.tie_embeddings) == (("subln", True) if arch == "bitnet" else ("none", False))
    assert cfg.ffn == ("relu2" if opts.get("relu2") else "swiglu")
    assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
            cfg.max_seq_len, cfg.vocab_size) == (2, 256, 512, 4, 2, 64, 64, len(tok))
    ref_q, ref_f = Reference(path, act_quant=True), Reference(path, act_quant=False)
    # codes and scale of every ternary linear: the file's dequantized weights (q/k rows un-permuted)
    dense = {f"layers.{n.split('.')[1]}" + {"attn_q": ".self_attn.q_proj", "attn_v": ".self_attn.v_proj",
             "ffn_down": ".mlp.down_proj"}[n.split(".")[2]] for n in opts.get("dense_linears", {})}
    assert sorted(model.quant_config.keep_high_precision) == sorted(dense) == sorted(info["high_precision"])
    for name, m in model.bitlinear_modules().items():
        assert m.quantize == (name not in dense), name
        i, sub, lin = name.split(".")[1:]
        g = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[lin]
        want = ref_f.W[f"blk.{i}.{g}.weight"] * ref_f.W.get(f"blk.{i}.{g}.scale", torch.tensor(1.0))
        if arch == "llama" and g in ("attn_q", "attn_k"):  # llama.cpp's (head, pair, 2) rows -> (head, 2, pair)
            heads = cfg.num_heads if g == "attn_q" else cfg.num_kv_heads
            want = want.reshape(heads, -1, 2, want.shape[1]).transpose(1, 2).reshape(want.shape)
        if m.quantize:
            codes, s_w = m.quantized_weight()
            torch.testing.assert_close(codes.float() * s_w, want, rtol=SCALE_RTOL, atol=0, msg=name)
        else:
            torch.testing.assert_close(m.weight.detach(), want, rtol=0, atol=0, msg=name)
    ids = ids_of(tok)
    with torch.no_grad():
        ours = model(torch.from_numpy(ids)[None])[0].numpy()
        ours_float = float_twin(model)(torch.from_numpy(ids)[None])[0].numpy()
    # float semantics (config, names, RoPE order, norms, scales) to float tolerance
    np.testing.assert_allclose(ours_float, ref_f.forward(ids), rtol=1e-4, atol=1e-4 * np.abs(ours_float).max())
    # and the imported model itself (int8 activations) against the reference with them
    assert_close(ours, ref_q.forward(ids), case)
    # the tokenizer and chat template came along
    assert tokenizer.encode(TEXT, add_special_tokens=False) == tok.encode(TEXT, add_special_tokens=False)
    assert tokenizer.chat_template == CHAT and tokenizer.eos_token == "<|endoftext|>"


@pytest.mark.slow
def test_llama_reference_matches_transformers(tmp_path, tok):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    arch, qtype, opts = CASES["llama-TQ1_0"]
    path = write_gguf(tmp_path / "m.gguf", arch, qtype, tok, **opts)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32).eval()
    ids = ids_of(tok)
    with torch.no_grad():
        want = hf(torch.from_numpy(ids)[None]).logits[0].numpy()
    np.testing.assert_allclose(Reference(path, act_quant=False).forward(ids), want, rtol=1e-4,
                               atol=1e-4 * np.abs(want).max())
    _, tokenizer, _ = load_ternary_gguf(path)  # ours does not go through AutoTokenizer; the same tokens
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    text = TEXT[:200] + " 12345 <|endoftext|>"
    assert tokenizer.encode(text) == hf_tok.encode(text)


class _RefEngine:
    """The reference behind the engine interface that runtime.evaluate.perplexity uses."""

    def __init__(self, ref):
        self.ref, self.max_seq_len = ref, ref.max_seq_len

    def forward(self, ids):
        return self.ref.forward(ids)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_exported_bitnet_runs_like_the_reference(tmp_path, tok, case):
    from bitnet_train.runtime import Engine
    from bitnet_train.runtime.evaluate import perplexity
    from bitnet_train.runtime.tokenizer import Tokenizer

    arch, qtype, opts = CASES[case]
    path = write_gguf(tmp_path / "m.gguf", arch, qtype, tok, **opts)
    assert main([str(path), "-o", str(tmp_path / "m.bitnet"), "--dtype", "fp32", "-q"]) == 0
    f = open_model(tmp_path / "m.bitnet")
    assert f.provenance["source_kind"] == "gguf" and f.provenance["gguf"]["architecture"] == arch
    rt = Tokenizer.from_model_file(f)
    assert rt.encode(TEXT, add_special_tokens=False) == tok.encode(TEXT, add_special_tokens=False)
    assert rt.chat_template == CHAT
    ref, eng = Reference(path), Engine.load(tmp_path / "m.bitnet")
    ids = np.array(tok.encode(TEXT * 2, add_special_tokens=False), dtype=np.int64)[:150]
    want, got = perplexity(_RefEngine(ref), ids, window=64, stride=32), perplexity(eng, ids, window=64, stride=32)
    assert abs(got.ppl / want.ppl - 1) < 1e-3, (got.ppl, want.ppl)
    prompt = ids[:8]
    seq = list(prompt)
    for _ in range(32):
        seq.append(int(ref.forward(seq)[-1].argmax()))
    cache = eng.new_cache()
    out = [int(eng.forward(prompt, cache=cache, last_only=True).argmax())]
    for _ in range(31):
        out.append(int(eng.forward([out[-1]], cache=cache, last_only=True).argmax()))
    assert out == seq[len(prompt):]


# ---- our own GGUF export, imported back --------------------------------------------------------

def roundtrip_files(tmp_path, tok, model, packing) -> tuple:
    """model -> direct.bitnet, and model -> m.gguf (--format gguf) -> back.bitnet; both opened."""
    save_model_dir(tmp_path / "model", model, tok)
    assert main([str(tmp_path / "model"), "-o", str(tmp_path / "direct.bitnet"), "--packing", packing, "-q"]) == 0
    assert main([str(tmp_path / "model"), "-o", str(tmp_path / "m.gguf"), "--format", "gguf", "--packing", packing,
                 "-q"]) == 0
    assert main([str(tmp_path / "m.gguf"), "-o", str(tmp_path / "back.bitnet"), "--packing", packing, "-q"]) == 0
    return open_model(tmp_path / "direct.bitnet"), open_model(tmp_path / "back.bitnet")


def roundtrip_model(tok, norm: str, exact_scales: bool) -> BitNetModel:
    torch.manual_seed(1)
    cfg = ModelConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_seq_len=64, norm=norm, tie_embeddings=norm == "subln")
    model = BitNetModel(cfg, QuantConfig()).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
        if exact_scales:
            # half the codes nonzero and a power-of-two scale: fp16 holds the scale exactly, and the latent
            # weights (codes * 2 * scale) have an exact fp32 absmean, so every step keeps it bit for bit
            for m in model.bitlinear_modules().values():
                n = m.weight.numel()
                codes = torch.cat([torch.ones(n // 4), -torch.ones(n // 4), torch.zeros(n - n // 2)])
                codes = codes[torch.randperm(n, generator=g)].reshape(m.weight.shape)
                scale = 2.0 ** -int(torch.randint(4, 8, (), generator=g))
                m.weight.copy_(ternary_master_weight(codes, scale))
                assert torch.equal(m.quantized_weight()[1], torch.tensor(scale))
    return model


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["subln", "none"])
@pytest.mark.parametrize("packing", ["2bit", "1.6bit"])
def test_our_gguf_export_imports_back_bit_for_bit(tmp_path, tok, norm, packing):
    """Scales fp16 keeps exactly: the .bitnet made from our GGUF equals the direct one in every tensor,
    so the engine computes the same logits."""
    from bitnet_train.runtime import Engine

    a, b = roundtrip_files(tmp_path, tok, roundtrip_model(tok, norm, exact_scales=True), packing)
    assert a.config == b.config and a.quant == b.quant and a.names == b.names
    for name in a.names:
        np.testing.assert_array_equal(a.tensor(name), b.tensor(name), err_msg=name)
    assert json.loads(b.tokenizer_json)["model"]["vocab"] == json.loads(a.tokenizer_json)["model"]["vocab"]
    ids = ids_of(tok, 30)
    np.testing.assert_array_equal(Engine.load(a.path).forward(ids), Engine.load(b.path).forward(ids))


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["subln", "none"])
def test_our_gguf_export_imports_back_with_fp16_scales(tmp_path, tok, norm):
    """Any scale: the GGUF keeps it as an fp16 block d; codes and dense tensors come back exactly."""
    a, b = roundtrip_files(tmp_path, tok, roundtrip_model(tok, norm, exact_scales=False), "2bit")
    assert a.config == b.config and a.ternary_layers() == b.ternary_layers()
    for name in a.ternary_layers():
        np.testing.assert_array_equal(a.codes(name), b.codes(name), err_msg=name)
        np.testing.assert_allclose(b.scale(name), np.float32(np.float16(a.scale(name))), rtol=SCALE_RTOL, atol=0)
    for name in a.names:
        if not name.endswith((".qweight", ".scale")):
            np.testing.assert_array_equal(a.dense(name), b.dense(name), err_msg=name)


# ---- bad input: one line naming the key or tensor ------------------------------------------------

SMALL = dict(hidden=256, ffn=256, n_head=4, n_kv=4, n_layer=1, ctx=32)


def expect_error(path, match, capsys=None, ptq=False):
    with pytest.raises(CheckpointError, match=match) as e:
        load_ternary_gguf(path, ptq=ptq)
    assert "\n" not in str(e.value)
    if capsys is not None:
        capsys.readouterr()
        assert main([str(path), "-o", str(path.with_suffix(".bitnet")), "-q"] + (["--ptq"] if ptq else [])) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err and not path.with_suffix(".bitnet").exists(), err


def test_unsupported_architecture(tmp_path, tok, capsys):
    path = write_gguf(tmp_path / "m.gguf", "qwen2", Q.TQ2_0, tok, **SMALL)
    expect_error(path, r"general.architecture 'qwen2' is not a ternary architecture", capsys)


def test_non_ternary_quant_type_on_a_linear(tmp_path, tok, capsys):
    q4k = np.random.default_rng(0).integers(0, 256, (256, 144), dtype=np.uint8)
    path = write_gguf(tmp_path / "m.gguf", "llama", Q.TQ2_0, tok, **SMALL,
                      override={"blk.0.ffn_up.weight": (q4k, Q.Q4_K)})
    expect_error(path, r"tensor blk\.0\.ffn_up\.weight is Q4_K", capsys)


def test_other_quant_types_are_dequantized_with_ptq(tmp_path, tok):
    rng = np.random.default_rng(0)
    embd = quantize(rng.standard_normal((len(tok), 256)).astype(np.float32), Q.Q4_0)
    up = quantize(rng.standard_normal((256, 256)).astype(np.float32), Q.Q4_0)
    path = write_gguf(tmp_path / "m.gguf", "llama", Q.TQ2_0, tok, **SMALL,
                      override={"token_embd.weight": (embd, Q.Q4_0), "blk.0.ffn_up.weight": (up, Q.Q4_0)})
    expect_error(path, r"tensor token_embd\.weight is Q4_0")
    model, _, info = load_ternary_gguf(path, ptq=True)
    assert info["dequantized"] == ["blk.0.ffn_up.weight"]
    np.testing.assert_array_equal(model.embed_tokens.weight.detach().numpy(), dequantize(embd, Q.Q4_0))
    up_proj = model.bitlinear_modules()["layers.0.mlp.up_proj"]
    assert up_proj.quantize and torch.equal(up_proj.weight.detach(), torch.from_numpy(dequantize(up, Q.Q4_0)))


def test_blocks_with_different_scales_need_ptq(tmp_path, tok, capsys):
    rng = np.random.default_rng(0)
    codes = rng.integers(-1, 2, (256, 512)).astype(np.float32)
    w = codes * np.float32(0.02)
    w[7, 256:] *= 3  # one block of one row has its own d
    path = write_gguf(tmp_path / "m.gguf", "bitnet", Q.TQ1_0, tok, **{**SMALL, "ffn": 512},
                      override={"blk.0.ffn_down.weight": (quantize(w, Q.TQ1_0), Q.TQ1_0)})
    expect_error(path, r"tensor blk\.0\.ffn_down\.weight \(TQ1_0\) has 2 different block scales d .*--ptq", capsys)
    # --ptq: the dequantized weights, re-ternarized per tensor by the export
    assert main([str(path), "-o", str(tmp_path / "p.bitnet"), "--ptq", "-q"]) == 0
    f = open_model(tmp_path / "p.bitnet")
    c, s = weight_quant(torch.from_numpy(dequantize(quantize(w, Q.TQ1_0), Q.TQ1_0).reshape(256, 512)))
    np.testing.assert_array_equal(f.codes("layers.0.mlp.down_proj"), c.numpy())
    assert f.scale("layers.0.mlp.down_proj") == np.float32(s)


def test_zero_blocks_carry_no_scale(tmp_path, tok):
    """gguf-py writes d = 0 for a block of zeros: such blocks (and an all-zero tensor) are not a second scale."""
    rng = np.random.default_rng(0)
    w = rng.integers(-1, 2, (256, 256)).astype(np.float32) * np.float32(0.03125)
    w[5] = 0  # one row's only block
    path = write_gguf(tmp_path / "m.gguf", "llama", Q.TQ1_0, tok, **SMALL, override={
        "blk.0.ffn_gate.weight": (quantize(w, Q.TQ1_0), Q.TQ1_0),
        "blk.0.attn_v.weight": (quantize(np.zeros((256, 256), np.float32), Q.TQ1_0), Q.TQ1_0)})
    model, _, _ = load_ternary_gguf(path)
    codes, s_w = model.bitlinear_modules()["layers.0.mlp.gate_proj"].quantized_weight()
    assert torch.equal(codes, torch.from_numpy(w / np.float32(0.03125)).to(torch.int8))
    assert s_w.item() == pytest.approx(0.03125, rel=SCALE_RTOL)
    assert not model.bitlinear_modules()["layers.0.self_attn.v_proj"].weight.any()


def test_tq2_code_3_is_not_ternary(tmp_path, tok):
    data = quantize(np.full((256, 256), 0.02, np.float32), Q.TQ2_0)
    data[3, 5] |= 0b11  # element 5 of row 3: digit 3
    path = write_gguf(tmp_path / "m.gguf", "llama", Q.TQ2_0, tok, **SMALL,
                      override={"blk.0.attn_v.weight": (data, Q.TQ2_0)})
    expect_error(path, r"tensor blk\.0\.attn_v\.weight \(TQ2_0\) has the code 3 .* row 3, element 5")


def test_structural_errors_name_the_tensor_or_key(tmp_path, tok):
    bad_norm = np.ones(128, np.float32)
    expect_error(write_gguf(tmp_path / "a.gguf", "llama", Q.TQ2_0, tok, **SMALL,
                            override={"blk.0.ffn_norm.weight": (bad_norm, None)}),
                 r"tensor blk\.0\.ffn_norm\.weight has shape \[128\] .* expected \[256\]")
    expect_error(write_gguf(tmp_path / "b.gguf", "llama", Q.TQ2_0, tok, **SMALL,
                            override={"blk.0.attn_q.bias": (np.zeros(256, np.float32), None)}),
                 r"tensor blk\.0\.attn_q\.bias is not part of the llama architecture")
    expect_error(write_gguf(tmp_path / "c.gguf", "bitnet", Q.TQ2_0, tok, **SMALL,
                            override={"output.weight": (np.zeros((len(tok), 256), np.float16), None)}),
                 r"tensor output\.weight: llama\.cpp's bitnet graph")
    expect_error(write_gguf(tmp_path / "d.gguf", "llama", Q.TQ2_0, tok, **SMALL,
                            extra_kv={"llama.rope.scaling.type": "yarn"}), r"llama\.rope\.scaling\.type 'yarn'")
    expect_error(write_gguf(tmp_path / "e.gguf", "bitnet", Q.TQ2_0, tok, **SMALL,
                            extra_kv={"bitnet.hidden_activation": "gelu"}), r"bitnet\.hidden_activation 'gelu'")
    expect_error(write_gguf(tmp_path / "f.gguf", "llama", Q.TQ2_0, tok, **SMALL,
                            extra_kv={"llama.attention.key_length": "64"}),
                 r"key 'llama\.attention\.key_length' must be an integer, got a string")


def test_non_ternary_gguf_still_needs_ptq(tmp_path, tok, capsys):
    path = write_gguf(tmp_path / "m.gguf", "llama", Q.F16, tok, **SMALL)
    assert main([str(path), "-o", str(tmp_path / "m.bitnet"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "without ternary (TQ1_0/TQ2_0) tensors" in err and "pass --ptq" in err


@pytest.fixture
def small_file(tmp_path, tok) -> Path:
    return write_gguf(tmp_path / "good.gguf", "llama", Q.TQ2_0, tok, **SMALL)


def locate_tensor_info(data: bytes, name: str) -> int:
    """Offset of the n_dims field of tensor `name`'s info (just after its name)."""
    at = data.index(struct.pack("<Q", len(name)) + name.encode(), 24)
    return at + 8 + len(name)


def patched(tmp_path, data: bytes, at: int, fmt: str, value) -> Path:
    b = bytearray(data)
    struct.pack_into(fmt, b, at, value)
    out = tmp_path / f"p{at}_{value}.gguf"
    out.write_bytes(bytes(b))
    return out


def test_truncated_files(tmp_path, small_file):
    data = small_file.read_bytes()
    info_end = GGUFFile(small_file).data_start
    cuts = [0, 3, 10, 23, 30, 200, 1000, info_end - 40, info_end - 1, info_end + 10, len(data) - 1]
    cuts += list(range(24, info_end, 977))
    for n in cuts:
        p = tmp_path / f"cut{n}.gguf"
        p.write_bytes(data[:n])
        with pytest.raises(CheckpointError, match="truncated|runs past the end|not a GGUF|claims") as e:
            load_ternary_gguf(p)
        assert "\n" not in str(e.value), n


def test_lying_counts_and_offsets(tmp_path, small_file):
    data = small_file.read_bytes()
    cases = [
        (8, "<Q", 1 << 60, r"claims 1152921504606846976 tensors"),
        (16, "<Q", 1 << 60, r"claims 1152921504606846976 key/value pairs"),
        (24, "<Q", 1 << 40, r"truncated: the name of key/value pair 0 \(1099511627776 bytes\)"),
        (4, "<I", 7, r"GGUF version 7"),
    ]
    tokens = data.index(b"tokenizer.ggml.tokens") + len("tokenizer.ggml.tokens")
    cases.append((tokens + 8, "<Q", 1 << 62, r"array 'tokenizer.ggml.tokens' claims 4611686018427387904 strings"))
    cases.append((tokens + 16, "<Q", 1 << 50, r"element 0 of array 'tokenizer.ggml.tokens' \(1125899906842624 bytes\)"))
    t = locate_tensor_info(data, "blk.0.ffn_up.weight")  # n_dims u32, ne0 u64, ne1 u64, type u32, offset u64
    cases += [
        (t, "<I", 9, r"tensor 'blk.0.ffn_up.weight' has 9 dimensions"),
        (t + 12, "<Q", 1 << 40, r"tensor 'blk.0.ffn_up.weight' data .* runs past the end"),
        (t + 4, "<Q", 100, r"tensor 'blk.0.ffn_up.weight' \(TQ2_0\) has rows of 100 weights"),
        (t + 20, "<I", 250, r"tensor 'blk.0.ffn_up.weight' has unknown ggml type id 250"),
        (t + 24, "<Q", 1 << 62, r"tensor 'blk.0.ffn_up.weight' data .* runs past the end"),
        (t + 24, "<Q", 33, r"tensor 'blk.0.ffn_up.weight' data offset 33 is not a multiple of the alignment 32"),
    ]
    for at, fmt, value, match in cases:
        with pytest.raises(CheckpointError, match=match) as e:
            load_ternary_gguf(patched(tmp_path, data, at, fmt, value))
        assert "\n" not in str(e.value), match


def test_block_count_larger_than_the_file(tmp_path, tok):
    path = write_gguf(tmp_path / "m.gguf", "llama", Q.TQ2_0, tok, **SMALL)
    data = path.read_bytes()
    key = b"llama.block_count"
    at = data.index(key) + len(key) + 4  # after the value type
    with pytest.raises(CheckpointError, match=r"llama.block_count 1000000000 needs at least 9000000000 tensors"):
        load_ternary_gguf(patched(tmp_path, data, at, "<I", 10 ** 9))


def test_random_corruption_gives_one_line_errors(tmp_path, small_file):
    """Bytes of the metadata before the token list, and of the tensor infos, overwritten at random: a clean
    load or a one-line BitNetError, never another exception."""
    data = small_file.read_bytes()
    f = GGUFFile(small_file)
    regions = [(24, data.index(b"tokenizer.ggml.tokens")), (f.data_start - 24 * len(f.tensors) - 400, f.data_start)]
    rng = np.random.default_rng(0)
    for k in range(200):
        b = bytearray(data)
        for at in rng.integers(*regions[k % 2], 1 + k % 3):
            b[at] = rng.integers(0, 256)
        p = tmp_path / f"c{k}.gguf"
        p.write_bytes(bytes(b))
        try:
            load_ternary_gguf(p)
        except BitNetError as e:
            assert "\n" not in str(e), str(e)
