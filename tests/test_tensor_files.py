"""bitnet_train.tensor_files: safetensors and torch.save checkpoints read one tensor at a time."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from bitnet_train.errors import BitNetError, CheckpointError
from bitnet_train.model import BitNetModel, ModelConfig, QuantConfig
from bitnet_train.tensor_files import (
    LazyCheckpoint, LazyTensor, SafetensorsFile, load_lazy_state, mapped_checkpoint, meta_model, safetensors_state,
)

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                  max_seq_len=16, tie_embeddings=True)


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, generator=g)
    return {"f32": x, "f16": x.half(), "bf16": x.bfloat16(), "f64": x.double(),
            "u8": torch.randint(0, 255, (3, 9), generator=g, dtype=torch.uint8),
            "i64": torch.arange(6).reshape(2, 3), "i8": torch.tensor([-3, 0, 7], dtype=torch.int8),
            "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(1.5), "empty": torch.zeros(0, 4)}


def test_reads_what_safetensors_wrote(tmp_path):
    tensors = sample_tensors()
    save_file(tensors, str(tmp_path / "a.safetensors"), metadata={"format": "pt"})
    f = SafetensorsFile(tmp_path / "a.safetensors")
    assert f.metadata == {"format": "pt"} and set(f.entries) == set(tensors)
    for name, want in tensors.items():
        lazy = f.lazy(name)
        assert lazy.shape == tuple(want.shape) and lazy.dtype == want.dtype
        got = lazy.load()
        assert got.dtype == want.dtype and torch.equal(got, want), name


def raw_file(path, header: dict, data: bytes = b"", length: int | None = None):
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head) if length is None else length) + head + data)
    return path


@pytest.mark.parametrize("header, data, length, match", [
    ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, None, "outside the 4-byte data section"),
    ({"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None, "F32 \\[3\\] needs 12"),
    ({"t": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "dtype 'Q4'"),
    ({"t": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "non-negative integers"),
    ({"t": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, None, "expected \\{dtype, shape, data_offsets\\}"),
    ({"t": 1}, b"", 10 ** 12, "header length 1000000000000 exceeds the file"),
])
def test_bad_headers_name_the_file_and_tensor(tmp_path, header, data, length, match):
    path = raw_file(tmp_path / "bad.safetensors", header, data, length)
    with pytest.raises(CheckpointError, match=match) as e:
        SafetensorsFile(path)
    assert str(path) in str(e.value)


def test_not_json_and_truncated(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 4) + b"{no]")
    with pytest.raises(CheckpointError, match="not JSON"):
        SafetensorsFile(path)
    save_file({"a": torch.ones(1000)}, str(path))
    f = SafetensorsFile(path)
    path.write_bytes(path.read_bytes()[:-100])  # shrinks after the header was read
    with pytest.raises(CheckpointError, match="truncated"):
        f.read("a")
    with pytest.raises(CheckpointError, match="outside"):
        SafetensorsFile(path)


def test_shards_are_merged_and_a_tensor_in_two_is_refused(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "1.safetensors"))
    save_file({"b": torch.zeros(3)}, str(tmp_path / "2.safetensors"))
    state = safetensors_state([tmp_path / "1.safetensors", tmp_path / "2.safetensors"])
    assert set(state) == {"a", "b"} and torch.equal(state["b"].load(), torch.zeros(3))
    save_file({"a": torch.ones(2)}, str(tmp_path / "3.safetensors"))
    with pytest.raises(CheckpointError, match="tensor a also appears in another shard"):
        safetensors_state([tmp_path / "1.safetensors", tmp_path / "3.safetensors"])


@pytest.mark.parametrize("zip_format", [True, False])
def test_mapped_checkpoint_reads_each_tensor_again_after_dropping_its_pages(tmp_path, zip_format):
    tensors = {k: v for k, v in sample_tensors().items() if k != "empty"}
    big = torch.randn(3, 4096)  # several pages: the ones dropped are read back from the file
    torch.save({"state_dict": {**tensors, "big": big}, "step": 3}, tmp_path / "c.ckpt",
               _use_new_zipfile_serialization=zip_format)
    ckpt, lazy = mapped_checkpoint(tmp_path / "c.ckpt")
    assert ckpt["step"] == 3
    for _ in range(2):
        for name, want in {**tensors, "big": big}.items():
            got = lazy(ckpt["state_dict"][name]).load()
            assert got.dtype == want.dtype and torch.equal(got, want), name


def test_mapped_checkpoint_bad_file(tmp_path):
    (tmp_path / "bad.ckpt").write_bytes(b"PK\3\4 not a zip")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        mapped_checkpoint(tmp_path / "bad.ckpt")


def test_load_lazy_state_equals_load_state_dict_and_reads_a_tied_tensor_once():
    src = BitNetModel(CFG, QuantConfig())
    reads: dict[str, int] = {}

    def counted(key, t):
        def load():
            reads[key] = reads.get(key, 0) + 1
            return t.half()  # converted into the fp32 parameter as load_state_dict would
        return LazyTensor(tuple(t.shape), torch.float16, load)

    state = {k: counted(k, v) for k, v in src.state_dict().items() if k != "lm_head.weight"}
    state["lm_head.weight"] = state["embed_tokens.weight"]
    dst = BitNetModel(CFG, QuantConfig())
    load_lazy_state(dst, state, "src")
    ref = BitNetModel(CFG, QuantConfig())
    ref.load_state_dict({k: v.half() for k, v in src.state_dict().items()})
    for k, v in ref.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    assert reads["embed_tokens.weight"] == 1 and all(n == 1 for n in reads.values())


def test_lazy_checkpoint_checks_names_and_shapes_before_reading():
    shapes = meta_model(CFG, QuantConfig()).state_dict()
    state = {k: LazyTensor(tuple(v.shape), torch.float32, lambda: pytest.fail("read")) for k, v in shapes.items()}
    LazyCheckpoint(CFG, QuantConfig(), dict(state), None, {}, "ok")
    bad = dict(state)
    del bad["norm.weight"]
    with pytest.raises(BitNetError, match=r"src: weights do not match .* missing \['norm.weight'\]"):
        LazyCheckpoint(CFG, QuantConfig(), bad, None, {}, "src")
    bad = {**state, "norm.weight": LazyTensor((7,), torch.float32, lambda: None)}
    with pytest.raises(BitNetError, match=r"tensor norm.weight has shape \(7,\), the model expects \(32,\)"):
        LazyCheckpoint(CFG, QuantConfig(), bad, None, {}, "src")


def test_meta_model_allocates_nothing_and_knows_the_bitlinears():
    m = meta_model(CFG, QuantConfig(keep_high_precision=["layers.0.*"]))
    assert all(t.is_meta for t in m.state_dict().values())
    flags = {n: b.quantize for n, b in m.bitlinear_modules().items()}
    assert flags["layers.0.mlp.up_proj"] is False and flags["layers.1.mlp.up_proj"] is True
