"""The reader: API on a small written file, and one FormatError per validation rule of FORMAT.md."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors import safe_open

from bitnet_train.export import packing as P
from bitnet_train.export.reader import open_model
from bitnet_train.export.schema import FormatError, linear_shapes
from bitnet_train.export.writer import ModelArrays, write_bitnet

from bitnet_files import mutate_meta, read_raw, write_raw

CFG = dict(qkv_bias=False, qk_norm=False, vocab_size=50, hidden_size=40, intermediate_size=72, num_layers=2, num_heads=4, num_kv_heads=2,
           head_dim=10, max_seq_len=16, rope_theta=10000.0, rms_norm_eps=1e-6, tie_embeddings=False,
           norm="subln", ffn="swiglu", init_std=0.02)


def random_arrays(cfg=CFG, dense_linears=("layers.0.mlp.up_proj",), seed=0) -> ModelArrays:
    from bitnet_train.export.schema import dense_shapes

    rng = np.random.default_rng(seed)
    ternary, dense = {}, {}
    for name, shape in linear_shapes(cfg).items():
        if name in dense_linears:
            dense[f"{name}.weight"] = rng.standard_normal(shape).astype(np.float32)
        else:
            ternary[name] = (rng.integers(-1, 2, shape).astype(np.int8), float(rng.uniform(0.01, 0.1)))
    for name, shape in dense_shapes(cfg).items():
        dense[name] = rng.standard_normal(shape).astype(np.float32)
    return ModelArrays(config=dict(cfg), eps=1e-5, ternary=ternary, dense=dense,
                       tokenizer_json=json.dumps({"version": "1.0", "model": {}}),
                       tokenizer_config={"chat_template": "{{ messages }}", "eos_token": "</s>"},
                       provenance={"recipe": "unit", "step": 3})


@pytest.fixture(scope="module")
def arrays():
    return random_arrays()


@pytest.fixture(scope="module", params=["i2_b128", "t3_b160", "t3_b5"])
def good_file(request, tmp_path_factory, arrays):
    path = tmp_path_factory.mktemp("good") / f"m_{request.param}.bitnet"
    write_bitnet(path, arrays, packing=request.param, dense_dtype="F32")
    return path


def test_reader_api(good_file, arrays):
    f = open_model(good_file)
    assert f.config == CFG
    assert f.quant["weight_scale"] == "multiply" and f.quant["rounding"] == "half_to_even"
    assert f.tokenizer_config["chat_template"] == "{{ messages }}"
    assert f.provenance == {"recipe": "unit", "step": 3}
    assert json.loads(f.tokenizer_json)["version"] == "1.0"
    # the lowest version that has the file's packing: t3_b160 came with version 2
    want_version = "2" if f.quant["packing"] == "t3_b160" else "1"
    assert f.metadata["format"] == "bitnet" and f.metadata["format_version"] == want_version
    layers = f.ternary_layers()
    assert "layers.0.mlp.up_proj" not in layers and f.dense_layers() == {"layers.0.mlp.up_proj": (72, 40)}
    assert layers["layers.1.mlp.down_proj"] == (40, 72)
    for name, (codes, scale) in arrays.ternary.items():
        np.testing.assert_array_equal(f.codes(name), codes)
        np.testing.assert_array_equal(f.dequantize(name), codes.astype(np.float32) * np.float32(scale))
    np.testing.assert_array_equal(f.dequantize("layers.0.mlp.up_proj"), arrays.dense["layers.0.mlp.up_proj.weight"])
    np.testing.assert_array_equal(f.dequantize("norm.weight"), arrays.dense["norm.weight"])
    t = f.tensor("embed_tokens.weight")
    assert isinstance(t.base, np.ndarray) or t.base is not None  # a view, not a copy
    with pytest.raises(ValueError):
        t[0, 0] = 1.0  # read-only
    with pytest.raises(FormatError, match="no tensor named 'nope'"):
        f.tensor("nope")


@pytest.mark.parametrize("packing", ["i2_b128", "t3_b160"])
def test_in_place_qweights_are_32_byte_aligned_and_safetensors_opens_it(tmp_path, arrays, packing):
    path = write_bitnet(tmp_path / "m.bitnet", arrays, packing=packing)
    header, _ = read_raw(path)
    data_start = path.stat().st_size - sum(e["data_offsets"][1] - e["data_offsets"][0]
                                           for k, e in header.items() if k != "__metadata__")
    assert data_start % 64 == 0
    for name, e in header.items():
        if name.endswith(".qweight"):
            assert (data_start + e["data_offsets"][0]) % 32 == 0, name
    with safe_open(str(path), "np") as st:
        assert st.metadata()["format"] == "bitnet"
        name = "layers.1.self_attn.q_proj.qweight"
        np.testing.assert_array_equal(st.get_tensor(name), open_model(path).tensor(name))


@pytest.mark.parametrize("dtype", ["F16", "BF16"])
def test_dense_dtypes(tmp_path, arrays, dtype):
    import torch

    f = open_model(write_bitnet(tmp_path / "m.bitnet", arrays, dense_dtype=dtype))
    x = arrays.dense["embed_tokens.weight"]
    want = torch.from_numpy(x).to(getattr(torch, {"F16": "float16", "BF16": "bfloat16"}[dtype])).float().numpy()
    np.testing.assert_array_equal(f.dense("embed_tokens.weight"), want)


def test_reader_does_not_import_torch(good_file):
    code = f"import sys; from bitnet_train.export.reader import open_model; open_model({str(good_file)!r}); " \
           "assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- one rule at a time --------------------------------------------------------------------

def expect(path, match):
    with pytest.raises(FormatError, match=match):
        open_model(path)


def test_wrong_version_and_format(good_file, tmp_path):
    expect(mutate_meta(good_file, tmp_path / "a", "format_version", lambda v: "3"), "format_version '3' is not supported")
    expect(mutate_meta(good_file, tmp_path / "c", "format_version", lambda v: "0"), "reads versions 1, 2")


def test_version_2_and_the_packings_it_allows(good_file, tmp_path):
    packing = open_model(good_file).quant["packing"]
    if packing == "t3_b160":  # a version-1 reader does not know it: such a file must not claim version 1
        expect(mutate_meta(good_file, tmp_path / "a", "format_version", lambda v: "1"),
               "quant.packing 't3_b160' needs format_version 2; this file says 1")
    else:  # version 2 is version 1 plus t3_b160: a version-1 packing under version 2 reads the same
        f = open_model(mutate_meta(good_file, tmp_path / "b", "format_version", lambda v: "2"))
        assert f.format_version == 2 and f.quant["packing"] == packing
    expect(mutate_meta(good_file, tmp_path / "b", "format", lambda v: "gguf"), "'format' is 'gguf'")


def test_metadata_schema(good_file, tmp_path):
    expect(mutate_meta(good_file, tmp_path / "a", "tokenizer_config", lambda v: None), r"missing \['tokenizer_config'\]")
    expect(mutate_meta(good_file, tmp_path / "b", "extra", lambda v: "x"), r"unexpected \['extra'\]")
    expect(mutate_meta(good_file, tmp_path / "c", "quant", lambda q: {**q, "weight_scale": "divide"}, as_json=True),
           "quant.weight_scale must be 'multiply'")
    expect(mutate_meta(good_file, tmp_path / "d", "quant", lambda q: {**q, "packing": "i4"}, as_json=True), "quant.packing")
    expect(mutate_meta(good_file, tmp_path / "e", "config", lambda c: {**c, "rope_scaling": 2}, as_json=True), "rope_scaling")
    expect(mutate_meta(good_file, tmp_path / "f", "config", lambda c: {**c, "num_kv_heads": 3}, as_json=True), "num_kv_heads")
    expect(mutate_meta(good_file, tmp_path / "g", "config", lambda c: {**c, "norm": "layer"}, as_json=True), "config.norm")
    expect(mutate_meta(good_file, tmp_path / "h", "provenance", lambda v: "not json {"), "'provenance' is not valid JSON")


def test_shapes_disagree_with_config(good_file, tmp_path):
    # the config says 3 layers: tensors for layer 2 are missing
    expect(mutate_meta(good_file, tmp_path / "a", "config", lambda c: {**c, "num_layers": 3}, as_json=True), "missing")
    # a wider hidden size: every shape is wrong; the metadata 'tensors' entry is named
    expect(mutate_meta(good_file, tmp_path / "b", "config", lambda c: {**c, "hidden_size": 48}, as_json=True), "tensors")


@pytest.mark.parametrize("layers", [10**12, 2**31, 2**63 - 1])
def test_a_config_claiming_huge_layer_counts_is_refused_before_anything_is_sized(good_file, tmp_path, layers):
    """Nothing per layer is built before the count is compared with the file's tensor list (this
    config once made the reader allocate by it: the OOM killer, or MemoryError under a limit)."""
    import resource

    bad = mutate_meta(good_file, tmp_path / "a", "config", lambda c: {**c, "num_layers": layers}, as_json=True)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    expect(bad, f"num_layers {layers}")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 * 1024  # KiB: nothing big was allocated


def test_a_config_claiming_an_endless_context_is_refused(good_file, tmp_path):
    expect(mutate_meta(good_file, tmp_path / "a", "config", lambda c: {**c, "max_seq_len": 2**31}, as_json=True),
           "max_seq_len must be at most 1048576")


def test_tensor_set_and_entries(good_file, tmp_path):
    header, data = read_raw(good_file)
    h = json.loads(json.dumps(header))
    del h["norm.weight"]
    expect(write_raw(tmp_path / "a", h, data), "bytes after the last tensor|hole|missing tensors")
    h = json.loads(json.dumps(header))
    h["layers.0.self_attn.q_proj.scale"]["dtype"] = "F16"
    h["layers.0.self_attn.q_proj.scale"]["shape"] = [2]
    expect(write_raw(tmp_path / "b", h, data), "layers.0.self_attn.q_proj.scale is F16")
    h = json.loads(json.dumps(header))
    e = h["norm.weight"]
    e["data_offsets"] = [e["data_offsets"][0] + 4, e["data_offsets"][1] + 4]
    expect(write_raw(tmp_path / "c", h, data), "norm.weight")
    h = json.loads(json.dumps(header))
    h["norm.weight"]["dtype"] = "I64"
    expect(write_raw(tmp_path / "d", h, data), "dtype 'I64'")
    h = json.loads(json.dumps(header))
    h["norm.weight"]["extra"] = 1
    expect(write_raw(tmp_path / "e", h, data), "exactly dtype, shape, data_offsets")
    h = json.loads(json.dumps(header))
    expect(write_raw(tmp_path / "f", h, data + b"\0" * 4), "bytes after the last tensor")


def test_checksums(good_file, tmp_path):
    header, data = read_raw(good_file)
    e = header["embed_tokens.weight"]
    bad = bytearray(data)
    bad[e["data_offsets"][0] + 5] ^= 0x01
    expect(write_raw(tmp_path / "a", header, bytes(bad)), "embed_tokens.weight: checksum mismatch")
    assert open_model(tmp_path / "a", verify_checksums=False).config == CFG  # opt-out for trusted files
    expect(mutate_meta(good_file, tmp_path / "b", "tokenizer", lambda v: v.replace("1.0", "1.1"), fix_checksum=False),
           "metadata checksum mismatch")


def test_invalid_codes_are_reported_on_use(tmp_path, arrays):
    path = write_bitnet(tmp_path / "m.bitnet", arrays, packing="i2_b128")
    header, data = read_raw(path)
    e = header["layers.0.self_attn.q_proj.qweight"]
    bad = bytearray(data)
    bad[e["data_offsets"][0]] = 0xFF  # four codes q = 3
    md = header["__metadata__"]
    ck = json.loads(md["checksums"])
    import zlib
    ck["tensors"]["layers.0.self_attn.q_proj.qweight"] = zlib.crc32(bytes(bad[e["data_offsets"][0]:e["data_offsets"][1]]))
    md["checksums"] = json.dumps(ck)
    f = open_model(write_raw(tmp_path / "b", header, bytes(bad)))
    with pytest.raises(FormatError, match="q_proj.qweight: invalid 2-bit code 3"):
        f.dequantize("layers.0.self_attn.q_proj")


def test_invalid_t3_b160_bytes_and_padding_are_reported_on_use(tmp_path, arrays):
    import zlib

    path = write_bitnet(tmp_path / "m.bitnet", arrays, packing="t3_b160")
    header, data = read_raw(path)
    md = header["__metadata__"]
    ck = json.loads(md["checksums"])
    name = "layers.1.mlp.down_proj.qweight"  # (40, 72): one block, elements 72..159 padding
    e = header[name]
    begin, end = e["data_offsets"]
    for i, (at, byte, match) in enumerate([(begin + 70, 20, "invalid t3_b160 byte 20 at row 2, byte 6"),
                                           (begin + 3, int(P.T160_ENCODE[0]), "padding")]):  # element 128 + 3: q = 0
        bad = bytearray(data)
        bad[at] = byte
        ck["tensors"][name] = zlib.crc32(bytes(bad[begin:end]))
        md["checksums"] = json.dumps(ck)
        f = open_model(write_raw(tmp_path / f"b{i}", header, bytes(bad)))
        with pytest.raises(FormatError, match=f"{name}: {match}"):
            f.codes("layers.1.mlp.down_proj")


def test_short_and_garbage_files(tmp_path):
    for i, content in enumerate([b"", b"\x01\x02", b"\xff" * 8, b"\x04\0\0\0\0\0\0\0{}  ", b"\x02\0\0\0\0\0\0\0[]",
                                 b"\x04\0\0\0\0\0\0\0\xff\xfe{}", b"\x08\0\0\0\0\0\0\0{\"a\":1}"]):
        tmp_path.joinpath(f"f{i}").write_bytes(content)
        expect(tmp_path / f"f{i}", ".")
    expect(tmp_path / "missing.bitnet", "cannot read")


def test_writer_refuses_bad_input(tmp_path, arrays):
    bad = random_arrays()
    bad.ternary["layers.0.self_attn.q_proj"] = (np.full((40, 40), 2, np.int8), 0.1)
    with pytest.raises(FormatError, match=r"q_proj: codes must be in \{-1, 0, 1\}"):
        write_bitnet(tmp_path / "x.bitnet", bad)
    bad = random_arrays()
    del bad.dense["norm.weight"]
    with pytest.raises(FormatError, match="missing.*norm.weight"):
        write_bitnet(tmp_path / "x.bitnet", bad)
    bad = random_arrays()
    bad.dense["embed_tokens.weight"] = bad.dense["embed_tokens.weight"] * 1e6
    with pytest.raises(FormatError, match="float16 range"):
        write_bitnet(tmp_path / "x.bitnet", bad)
    bad = random_arrays(cfg={**CFG, "rope_scaling": 2.0})
    with pytest.raises(FormatError, match="rope_scaling"):
        write_bitnet(tmp_path / "x.bitnet", bad)
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def test_packing_helpers_match_reader_shapes(good_file):
    f = open_model(good_file)
    for name, (o, i) in f.ternary_layers().items():
        assert f.tensor(f"{name}.qweight").shape == P.packed_shape(o, i, f.quant["packing"])


def test_files_written_before_the_qwen_keys_read_with_them_false(good_file, tmp_path):
    old = mutate_meta(good_file, tmp_path / "old", "config",
                      lambda c: {k: v for k, v in c.items() if k not in ("qkv_bias", "qk_norm")}, as_json=True)
    f = open_model(old)
    assert f.config["qkv_bias"] is False and f.config["qk_norm"] is False
    expect(mutate_meta(good_file, tmp_path / "bad", "config", lambda c: {**c, "qk_norm": 1}, as_json=True),
           "config.qk_norm must be true or false")
    # a file claiming q/k/v biases must store them: the tensor list no longer matches the config
    expect(mutate_meta(good_file, tmp_path / "b2", "config", lambda c: {**c, "qkv_bias": True}, as_json=True),
           r"missing \['layers.0.self_attn.k_proj.bias'")
