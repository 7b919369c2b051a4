"""Packing, the .bitnet format and bitnet-export.

    FORMAT.md       the .bitnet v1 file format (byte layouts, metadata schema, validation rules)
    packing         i2_b128 / t3_b160 / t3_b5 pack and unpack, vectorized and scalar reference (numpy only)
    schema          what a v1 file must contain; FormatError (numpy-free, torch-free)
    reader          open_model(path) -> BitNetFile: validate, then memory-map (numpy only)
    model_tensors   what the writers consume: a model's tensors produced one at a time (numpy only)
    writer          ModelArrays / any ModelTensors -> .bitnet file, tensor by tensor, atomically (numpy only)
    from_model      trained weights (torch) -> QuantizedTensors (quantized per tensor on demand) or
                    ModelArrays (a BitNetModel, all in memory): the export quantization step
    sources         run dir / Lightning .ckpt / model/ dir / HF dir / GGUF -> Source (lazy state dict)
    gguf_writer     --format gguf (llama.cpp: bitnet / llama arch, TQ2_0 / TQ1_0)
    hf_writer       --format hf (transformers BitNet layout: packed BitLinear, linear_class bitlinear)
    reference       the PyTorch forward built from a .bitnet file (the runtime's parity reference)
    summary, cli    bitnet-export
"""
