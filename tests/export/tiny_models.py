"""Tiny models for the export tests: a BPE tokenizer and a few optimizer steps of a plain torch loop."""

from __future__ import annotations

import torch

from bitnet_train.model import BitNetModel, ModelConfig, QuantConfig

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 8


def tiny_tokenizer():
    from bitnet_train.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer([TEXT], vocab_size=300, cache_dir=None)


def train_tiny(cfg: ModelConfig, quant: QuantConfig, steps: int = 5, seed: int = 0) -> BitNetModel:
    """A plain torch loop: enough steps that latent weights move away from their init."""
    torch.manual_seed(seed)
    model = BitNetModel(cfg, quant)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.randint(0, cfg.vocab_size, (4, 33), generator=torch.Generator().manual_seed(seed))
    model.train()
    for _ in range(steps):
        loss = model.loss(data[:, :-1], data[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4, num_kv_heads=2,
            max_seq_len=64)




def write_random_llama_dir(path, *, hidden: int, ffn: int, layers: int, vocab: int, heads: int, kv_heads: int,
                           shard_bytes: int, tokenizer=None, seed: int = 0) -> dict:
    """A Llama-family HF directory of random bf16 weights (std 0.02, unit norms), sharded like
    save_pretrained (model-0000N-of-0000M.safetensors + index) and written a tensor at a time, so a
    source of many GB costs one tensor of memory. -> {"bytes": weight bytes, "largest": elements}."""
    import json
    from pathlib import Path

    import numpy as np

    from bitnet_train.export.hf_writer import write_safetensors

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hd = hidden // heads
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes.update({
            f"{p}.input_layernorm.weight": (hidden,), f"{p}.post_attention_layernorm.weight": (hidden,),
            f"{p}.self_attn.q_proj.weight": (heads * hd, hidden), f"{p}.self_attn.k_proj.weight": (kv_heads * hd, hidden),
            f"{p}.self_attn.v_proj.weight": (kv_heads * hd, hidden), f"{p}.self_attn.o_proj.weight": (hidden, heads * hd),
            f"{p}.mlp.gate_proj.weight": (ffn, hidden), f"{p}.mlp.up_proj.weight": (ffn, hidden),
            f"{p}.mlp.down_proj.weight": (hidden, ffn)})
    shapes.update({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    shards: list[dict[str, tuple[int, ...]]] = [{}]
    for name, shape in shapes.items():
        if shards[-1] and 2 * sum(int(np.prod(s)) for s in shards[-1].values()) + 2 * int(np.prod(shape)) > shard_bytes:
            shards.append({})
        shards[-1][name] = shape
    g = torch.Generator().manual_seed(seed)
    weight_map = {}
    for k, names in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"

        def produce(names=names):
            for name, shape in names.items():
                t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g).mul_(0.02)
                yield name, t.to(torch.bfloat16).view(torch.uint16).numpy()

        write_safetensors(path / file, {n: ("BF16", s) for n, s in names.items()}, {"format": "pt"}, produce)
        weight_map.update(dict.fromkeys(names, file))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16"}))
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return {"bytes": 2 * sum(int(np.prod(s)) for s in shapes.values()),
            "largest": max(int(np.prod(s)) for s in shapes.values())}
