"""--ptq: a Hugging Face Llama directory ternarized straight to a .bitnet file."""

from __future__ import annotations

import pytest
import torch

from bitnet_train.export.cli import main
from bitnet_train.export.reader import open_model
from bitnet_train.quant import weight_quant

pytestmark = pytest.mark.slow


def test_hf_llama_directory_with_ptq(tmp_path, tokenizer, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False))
    hf.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    assert main([str(tmp_path / "hf"), "-o", str(tmp_path / "a.bitnet")]) == 2
    assert "pass --ptq" in capsys.readouterr().err
    assert main([str(tmp_path / "hf"), "-o", str(tmp_path / "a.bitnet"), "--ptq", "--dtype", "fp32", "-q"]) == 0
    f = open_model(tmp_path / "a.bitnet")
    assert f.config["norm"] == "none" and len(f.ternary_layers()) == 14
    assert f.provenance["ptq"] is True and f.provenance["source_kind"] == "hf"
    c, s = weight_quant(hf.model.layers[1].mlp.down_proj.weight.detach())
    assert torch.equal(torch.from_numpy(f.dequantize("layers.1.mlp.down_proj")), c * s)
    assert torch.equal(torch.from_numpy(f.dense("lm_head.weight")), hf.lm_head.weight.detach())
    assert f.tokenizer_json is not None
