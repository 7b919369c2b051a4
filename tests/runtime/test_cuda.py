"""CUDA engine: clear errors where it cannot run (every machine), parity with the CPU engine (GPU only).

The GPU tests compare the CUDA engine with the CPU engine on the same exported file: both follow the
same quantization contract, so logits agree up to summation order (now and then one int8
activation code flips, as between the CPU engine and PyTorch; see test_engine_parity.assert_close).
"""

from __future__ import annotations

import numpy as np
import pytest

from bitnet_train.runtime import Engine, _C
from bitnet_train.runtime.device import (
    CudaEngine,
    DeviceError,
    cuda_available,
    cuda_compiled,
    cuda_device_count,
    load_engine,
    require_device,
)

needs_gpu = pytest.mark.skipif(not cuda_available(), reason="no CUDA build or no CUDA device on this machine")
NO_CUDA_MESSAGE = r"CUDA support not compiled|no CUDA device found"


# ---- every machine ------------------------------------------------------------------------------

def test_cuda_flags_agree():
    assert isinstance(cuda_compiled(), bool) and isinstance(cuda_device_count(), int)
    assert cuda_available() == (cuda_compiled() and cuda_device_count() > 0)
    if not cuda_compiled():
        assert cuda_device_count() == 0 and not hasattr(_C, "CudaModel")


def test_cpu_is_always_available():
    require_device("cpu")


def test_unknown_device_is_named():
    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        require_device("tpu")


@pytest.mark.skipif(cuda_available(), reason="this machine can run CUDA")
def test_requesting_cuda_without_a_gpu_is_a_clear_error(tmp_path):
    with pytest.raises(DeviceError, match=NO_CUDA_MESSAGE):
        require_device("cuda")
    # before the file is even opened: the device is checked first
    with pytest.raises(DeviceError, match=NO_CUDA_MESSAGE):
        load_engine(tmp_path / "missing.bitnet", device="cuda")
    with pytest.raises(DeviceError, match=NO_CUDA_MESSAGE):
        CudaEngine({}, {})


def test_cpu_only_engine_options_are_refused_on_cuda():
    # named before the device is looked for, so this holds with or without a GPU
    with pytest.raises(DeviceError, match="lm_head='int8' is a CPU engine option"):
        CudaEngine({}, {}, lm_head="int8")
    with pytest.raises(DeviceError, match="kv_cache='f16' is a CPU engine option"):
        CudaEngine({}, {}, kv_cache="f16")


@pytest.mark.skipif(not cuda_compiled() or cuda_available(), reason="needs a CUDA build on a machine without a GPU")
def test_cuda_model_without_a_device_raises_runtime_error():
    # the C++ constructor checks the device before anything else
    with pytest.raises(RuntimeError, match="no CUDA device found"):
        _C.CudaModel(_C.ModelConfig(), [], 0)
    with pytest.raises(RuntimeError, match="no CUDA device found"):
        _C.cuda_bench_gemv(0, 64, 128)


# ---- GPU: parity with the CPU engine ------------------------------------------------------------

def _parity():
    """test_engine_parity's tiny models (imported lazily: it needs torch)."""
    pytest.importorskip("torch")
    import test_engine_parity as p

    return p


VARIANTS = {
    "subln-swiglu-gqa": dict(norm="subln", ffn="swiglu"),
    "bitlinear-relu2": dict(norm="bitlinear", ffn="relu2", num_kv_heads=4),
    "none-swiglu-mqa-tied": dict(norm="none", ffn="swiglu", num_kv_heads=1, tie_embeddings=True),
    "subln-relu2-headdim": dict(norm="subln", ffn="relu2", head_dim=32),
    # widths that are not multiples of 128 (or of 8: f16 rows not 16-byte aligned), 3 query heads per kv head
    "odd-shapes": dict(norm="subln", ffn="swiglu", hidden_size=108, num_heads=6, num_kv_heads=2,
                       intermediate_size=300),
    "qwen2-qkv-bias": dict(norm="none", ffn="swiglu", qkv_bias=True, tie_embeddings=True),
    "qwen3-qk-norm": dict(norm="none", ffn="swiglu", qk_norm=True, head_dim=32),
}


def _load_both(tmp_path, variant="subln-swiglu-gqa", dense_dtype="F16", keep=None, seed=0, **overrides):
    p = _parity()
    model = p.make_model({**VARIANTS[variant], **overrides}, keep=keep, seed=seed)
    path = p.export(model, tmp_path / "m.bitnet", dense_dtype=dense_dtype)
    return Engine.load(path, isa="scalar"), CudaEngine.load(path), model.config


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prefill_logits_match_cpu(tmp_path, variant):
    cpu, gpu, cfg = _load_both(tmp_path, variant)
    assert gpu.isa() == "cuda" and gpu.vocab_size == cfg.vocab_size
    # 3 and 7 tokens: the GEMV (m <= 8); 12 and 40: the tensor-core GEMM
    for seq in _parity().prompts(cfg.vocab_size, lengths=(3, 7, 12, 40)):
        _parity().assert_close(gpu.forward(seq), cpu.forward(seq), f"{variant} len {len(seq)}")


@pytest.mark.gpu
@needs_gpu
def test_a_t3_b160_file_is_repacked_at_upload_and_computes_the_i2_logits(tmp_path):
    """The GPU kernels read i2_b128: a 1.6-bit file is repacked tensor by tensor as it is uploaded,
    and computes exactly what the 2-bit export of the same model does on the GPU."""
    p = _parity()
    model = p.make_model({**VARIANTS["odd-shapes"]})
    i2 = CudaEngine.load(p.export(model, tmp_path / "i2.bitnet", dense_dtype="F16"))
    t3 = CudaEngine.load(p.export(model, tmp_path / "t3.bitnet", dense_dtype="F16", packing="t3_b160"))
    assert t3.weight_bytes_per_token == i2.weight_bytes_per_token  # the device reads 2-bit rows either way
    for seq in p.prompts(model.config.vocab_size, lengths=(3, 12)):
        np.testing.assert_array_equal(t3.forward(seq), i2.forward(seq))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dense_dtype", ["F32", "F16", "BF16"])
def test_dense_dtypes_and_hybrid_layers(tmp_path, dense_dtype):
    keep = ["layers.0.mlp.*", "layers.1.self_attn.o_proj"]
    for variant in ("subln-swiglu-gqa", "bitlinear-relu2"):
        cpu, gpu, cfg = _load_both(tmp_path, variant, dense_dtype=dense_dtype, keep=keep)
        for seq in _parity().prompts(cfg.vocab_size, lengths=(5, 19)):
            _parity().assert_close(gpu.forward(seq), cpu.forward(seq), f"{variant} {dense_dtype}")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("n_seqs", [1, 3, 5, 9])  # GEMV with 1, 4 and 8 rows per launch; GEMM past 8
def test_ragged_batches_and_cached_decode_match_cpu(tmp_path, n_seqs):
    cpu, gpu, cfg = _load_both(tmp_path, "subln-swiglu-gqa")
    lengths = [3 + (5 * i) % 11 for i in range(n_seqs)]
    seqs = _parity().prompts(cfg.vocab_size, lengths=lengths, seed=n_seqs)
    c_cache, g_cache = cpu.new_cache(n_seqs), gpu.new_cache(n_seqs)
    want = cpu.forward([s[:2] for s in seqs], cache=c_cache)
    got = gpu.forward([s[:2] for s in seqs], cache=g_cache)
    for i in range(n_seqs):
        _parity().assert_close(got[i], want[i], f"prefill seq {i}")
    for t in range(2, max(lengths)):
        live = [i for i, s in enumerate(seqs) if t < len(s)]
        step = [[int(seqs[i][t])] for i in live]
        want = cpu.forward(step, cache=c_cache, seq_ids=live, last_only=True)
        got = gpu.forward(step, cache=g_cache, seq_ids=live, last_only=True)
        _parity().assert_close(got, want, f"decode step {t}")
    assert [g_cache.length(i) for i in range(n_seqs)] == lengths


@pytest.mark.gpu
@needs_gpu
def test_long_context_attention_matches_cpu(tmp_path):
    # > 128 cached positions: the attention kernel's online softmax over several chunks
    cpu, gpu, cfg = _load_both(tmp_path, "subln-swiglu-gqa", max_seq_len=400)
    seq = _parity().prompts(cfg.vocab_size, lengths=(300,))[0]
    _parity().assert_close(gpu.forward(seq), cpu.forward(seq), "300 tokens")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_same_greedy_tokens_as_cpu(tmp_path, variant):
    cpu, gpu, cfg = _load_both(tmp_path, variant, seed=3)
    prompt = _parity().prompts(cfg.vocab_size, lengths=(5,))[0]
    steps = cfg.max_seq_len - len(prompt)

    def greedy(eng):
        cache = eng.new_cache()
        nxt = int(eng.forward(prompt, cache=cache, last_only=True).argmax())
        out = [nxt]
        for _ in range(steps - 1):
            nxt = int(eng.forward([nxt], cache=cache, last_only=True).argmax())
            out.append(nxt)
        return out

    want = greedy(cpu)
    assert greedy(gpu) == want
    # the on-device loop (argmax kernel, CUDA graph replay) gives the same tokens
    for use_graph in (True, False):
        cache = gpu.new_cache()
        gpu.forward(prompt[:-1], cache=cache)
        got = gpu.greedy_decode([int(prompt[-1])], steps, cache=cache, use_graph=use_graph)
        assert got[:, 0].tolist() == want, f"greedy_decode use_graph={use_graph}"
        assert cache.length(0) == len(prompt) - 1 + steps


@pytest.mark.gpu
@needs_gpu
def test_bad_input_is_rejected_like_the_cpu_engine(tmp_path):
    cpu, gpu, cfg = _load_both(tmp_path)
    cache = gpu.new_cache(2, 8)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        gpu.forward([cfg.vocab_size], cache=cache)
    with pytest.raises(ValueError, match="exceeds the context"):
        gpu.forward(np.zeros(9, np.int64), cache=cache)
    with pytest.raises(ValueError, match="appears twice"):
        gpu.forward([[1], [2]], cache=cache, seq_ids=[0, 0])
    (tmp_path / "b").mkdir()
    other = _load_both(tmp_path / "b", "bitlinear-relu2")[1]
    with pytest.raises(ValueError, match="another model config"):
        gpu.forward([1], cache=other.new_cache())
    assert cache.length(0) == 0  # nothing was appended by the refused calls
    with pytest.raises(ValueError, match="missing tensor"):
        tensors = {"embed_tokens.weight": np.zeros((cfg.vocab_size, cfg.hidden_size), np.float32)}
        CudaEngine(cpu.config, tensors)


@pytest.mark.gpu
@needs_gpu
def test_gemv_bench_helper_runs():
    seconds = _C.cuda_bench_gemv(0, 2560, 2560, 1, 10)
    assert 0 < seconds < 1
