// libFuzzer target: the C++ code that sizes buffers from a model config (Model construction, the
// KV cache, a forward pass) on configs and tensor tables from the fuzzer. Every failure must be a
// typed exception (std::invalid_argument / std::runtime_error), never a crash, a sanitizer report
// or an allocation the tensors do not justify (libFuzzer's -rss_limit_mb and -malloc_limit_mb).
//   CXX=clang++ cmake -S . -B build/fuzz -DBITNET_PYTHON=OFF -DBITNET_FUZZ=ON -DBITNET_CUDA=OFF
//   cmake --build build/fuzz --target bitnet_fuzz_model && build/fuzz/bitnet_fuzz_model CORPUS_DIR
// Input (little-endian; missing bytes read as 0):
//   8 x u32  vocab, hidden, ffn, layers, heads, kv_heads, head_dim, max_seq_len   (the config)
//   4 x u8   norm (0 subln, 1 bitlinear, 2 none), ffn (0 swiglu, 1 relu2), tie, dense dtype (0 f16, 1 bf16, 2 f32;
//            bit 7 set: the ternary tensors are t3_b160 instead of i2_b128)
//   then one u8 per tensor the config asks for, in model order: 0 as expected, 1 left out, 2 first
//   dimension + 1, 3 ternary<->dense dtype swap, 4 a tensor under a wrong name (others: as 0)
//   then u8 n_seqs, u16 cache length, u8 tokens per sequence, and u32 token ids.
// Seeds: bench/fuzz_engine.py writes them from the configs of real exports.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "engine.h"

using namespace bitnet;

namespace {

struct Reader {
  const uint8_t* p;
  size_t n, at = 0;
  uint64_t take(int bytes) {
    uint64_t v = 0;
    for (int i = 0; i < bytes; ++i, ++at)
      if (at < n) v |= static_cast<uint64_t>(p[at]) << (8 * i);
    return v;
  }
};

constexpr size_t kBacking = 8 << 20;  // every tensor points into this zeroed buffer: shapes beyond it are skipped
alignas(64) static uint8_t g_backing[kBacking];

int64_t bytes_of(const TensorRef& t) {  // -1 when the tensor would not fit the backing buffer
  int64_t bytes = dtype_size(t.dtype);
  for (int64_t d : t.shape) {
    if (d <= 0 || d > (int64_t{1} << 31)) return -1;
    bytes *= d;
    if (bytes > static_cast<int64_t>(kBacking)) return -1;
  }
  return bytes;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Reader in{data, size};
  ModelConfig c;
  c.vocab_size = static_cast<int64_t>(in.take(4));
  c.hidden_size = static_cast<int64_t>(in.take(4));
  c.intermediate_size = static_cast<int64_t>(in.take(4));
  c.num_layers = static_cast<int64_t>(in.take(4));
  c.num_heads = static_cast<int64_t>(in.take(4));
  c.num_kv_heads = static_cast<int64_t>(in.take(4));
  c.head_dim = static_cast<int64_t>(in.take(4));
  c.max_seq_len = static_cast<int64_t>(in.take(4));
  const int norm = static_cast<int>(in.take(1) % 3), ffn = static_cast<int>(in.take(1) % 2);
  c.norm = norm == 0 ? NormKind::SubLN : norm == 1 ? NormKind::BitLinear : NormKind::None;
  c.ffn = ffn == 0 ? FfnKind::SwiGLU : FfnKind::ReLU2;
  c.tie_embeddings = in.take(1) & 1;
  const int dbyte = static_cast<int>(in.take(1)), dsel = (dbyte & 0x7f) % 3;
  const DType dense = dsel == 0 ? DType::F16 : dsel == 1 ? DType::BF16 : DType::F32;
  c.packing = dbyte & 0x80 ? Packing::T3B160 : Packing::I2B128;  // zero bytes are valid codes in both

  // The tensor table the config asks for, each mutated by one input byte. Names are made for at
  // most 64 layers: a config claiming more must be refused for the tensors it lacks.
  TensorMap tensors;
  // (the harness's own sizes, clamped so its products cannot overflow; the Model sees the raw config)
  auto cl = [](int64_t v) { return std::min<int64_t>(v, (int64_t{1} << 31) + 1); };
  const int64_t d = cl(c.hidden_size), f = cl(c.intermediate_size), V = cl(c.vocab_size);
  const int64_t qd = cl(c.num_heads) * cl(c.head_dim), kvd = cl(c.num_kv_heads) * cl(c.head_dim);
  auto add = [&](const std::string& name, DType dt, std::vector<int64_t> shape) {
    const int op = static_cast<int>(in.take(1));
    if (op == 1) return;
    TensorRef t{dt, g_backing, std::move(shape)};
    if (op == 2 && !t.shape.empty()) t.shape[0] += 1;
    if (op == 3) t.dtype = t.dtype == DType::U8 ? dense : DType::U8;
    if (bytes_of(t) < 0) return;  // larger than the backing buffer: the caller could not have such an array
    tensors[op == 4 ? name + ".x" : name] = t;
  };
  add("embed_tokens.weight", dense, {V, d});
  if (!c.tie_embeddings) add("lm_head.weight", dense, {V, d});
  add("norm.weight", dense, {d});
  const int64_t layers = std::min<int64_t>(c.num_layers, 64);
  auto linear = [&](const std::string& name, int64_t out, int64_t in_f) {
    add(name + ".qweight", DType::U8, {out, c.packing == Packing::T3B160 ? ((in_f + 159) / 160) * 32 : ((in_f + 127) / 128) * 32});
    add(name + ".scale", DType::F32, {1});
    if (c.norm == NormKind::BitLinear) add(name + ".norm.weight", dense, {in_f});
  };
  for (int64_t l = 0; l < layers; ++l) {
    const std::string p = "layers." + std::to_string(l) + ".";
    add(p + "input_layernorm.weight", dense, {d});
    add(p + "post_attention_layernorm.weight", dense, {d});
    linear(p + "self_attn.q_proj", qd, d);
    linear(p + "self_attn.k_proj", kvd, d);
    linear(p + "self_attn.v_proj", kvd, d);
    linear(p + "self_attn.o_proj", d, qd);
    linear(p + "mlp.gate_proj", f, d);
    linear(p + "mlp.up_proj", f, d);
    linear(p + "mlp.down_proj", d, f);
    if (c.norm == NormKind::SubLN) {
      add(p + "self_attn.attn_sub_norm.weight", dense, {qd});
      add(p + "mlp.ffn_sub_norm.weight", dense, {f});
    }
  }
  const int64_t n_seqs = static_cast<int64_t>(in.take(1) % 4) + 1;
  const int64_t max_len = static_cast<int64_t>(in.take(2) % 64) + 1;
  const int64_t per_seq = static_cast<int64_t>(in.take(1) % 8) + 1;
  try {
    Model model(c, tensors, "scalar");
    model.set_threads(1);
    // the harness's own bound: caches a caller could hold (the engine refuses only what RAM cannot)
    const double kv_bytes = 2.0 * 4 * static_cast<double>(c.num_layers) * static_cast<double>(n_seqs) *
                            static_cast<double>(c.num_kv_heads) * static_cast<double>(max_len) * static_cast<double>(c.head_dim);
    if (kv_bytes > 256.0 * (1 << 20)) return 0;
    KVCache cache(c, n_seqs, max_len);
    std::vector<int32_t> tokens;
    Batch b;
    b.offsets.push_back(0);
    for (int64_t s = 0; s < n_seqs; ++s) {
      b.seq_ids.push_back(s);
      for (int64_t t = 0; t < per_seq; ++t) tokens.push_back(static_cast<int32_t>(in.take(4)));
      b.offsets.push_back(static_cast<int64_t>(tokens.size()));
    }
    b.tokens = tokens.data();
    if (static_cast<double>(n_seqs) * static_cast<double>(c.vocab_size) * 4 > 256.0 * (1 << 20)) return 0;
    std::vector<float> logits(static_cast<size_t>(n_seqs * c.vocab_size));
    model.forward(cache, b, false, logits.data());
    cache.truncate(0, cache.length(0) / 2);
  } catch (const std::invalid_argument&) {
  } catch (const std::runtime_error&) {
  }
  return 0;
}
