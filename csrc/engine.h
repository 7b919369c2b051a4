// CPU inference engine: a Llama-style BitNet b1.58 model over borrowed weight buffers.
//
// The model never owns ternary or dense matrix data: it keeps pointers into buffers that the
// caller (the Python loader: numpy arrays, usually memory-mapped from the .bitnet file) keeps
// alive for the model's lifetime. Ternary weights are read in place, in the i2_b128 (2-bit) or
// t3_b160 (1.6-bit) layout that ModelConfig::packing names: no second copy of them is made.
// Norm weights (small vectors) are converted to fp32 copies at load. Dense matrices (embeddings,
// lm_head, hybrid-precision linears) stay fp16/bf16/fp32 and are converted per use in the kernels.
//
// Every shape and dtype handed in is checked; bad input throws std::invalid_argument (Python
// ValueError) naming the tensor and what was expected.
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "cpu/kernels.h"

namespace bitnet {

enum class NormKind { SubLN, BitLinear, None };
enum class FfnKind { SwiGLU, ReLU2 };

// Longest context a config may declare (2^20 = 1,048,576 tokens: the 1M-token models fit).
constexpr int64_t kMaxSeqLen = int64_t{1} << 20;

struct ModelConfig {
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t max_seq_len = 0;
  float rope_theta = 10000.0f;
  float rms_norm_eps = 1e-6f;
  float act_eps = 1e-5f;  // activation quantization: s_x = 127 / max(max|x|, act_eps)
  Packing packing = Packing::I2B128;  // layout of every ternary `.qweight` (the file's quant.packing)
  bool tie_embeddings = false;
  NormKind norm = NormKind::SubLN;
  FfnKind ffn = FfnKind::SwiGLU;
  bool qkv_bias = false;  // Qwen2: fp32 biases on q, k, v, added after the product
  bool qk_norm = false;   // Qwen3: RMSNorm over head_dim on each q and k head, before RoPE

  void validate() const;  // throws std::invalid_argument
};

struct TensorRef {
  DType dtype = DType::F32;
  const void* data = nullptr;
  std::vector<int64_t> shape;
};
using TensorMap = std::map<std::string, TensorRef>;

struct Linear {
  std::string name;
  int64_t in = 0, out = 0;
  bool ternary = false;
  // ternary: codes (out, n_blocks * 32 bytes) in `packing` and the per-tensor scale (W ~ c * s_w)
  const uint8_t* qweight = nullptr;
  Packing packing = Packing::I2B128;
  int64_t n_blocks = 0;
  float s_w = 0.0f;
  // hybrid precision: dense (out, in)
  const void* dense = nullptr;
  DType dense_dtype = DType::F32;
  // per-row int8 (out, in) with out scales, used instead of `dense` when set (the int8 lm_head)
  const int8_t* q8 = nullptr;
  const float* q8_scale = nullptr;
  std::vector<float> norm;  // in-layer RMSNorm weight (norm == "bitlinear"), else empty
  std::vector<float> bias;  // (out) fp32, added after the product (qkv_bias), else empty
};

struct Layer {
  std::vector<float> input_norm, post_attention_norm;  // (hidden)
  std::vector<float> attn_sub_norm;                    // (heads * head_dim), SubLN only
  std::vector<float> ffn_sub_norm;                     // (intermediate), SubLN only
  std::vector<float> q_norm, k_norm;                   // (head_dim), qk_norm only
  Linear q, k, v, o, gate, up, down;
};

// Per-sequence key/value cache: n_seqs independent sequences of up to max_len positions.
// Layout per layer: (seq, kv_head, pos, head_dim), keys after RoPE; fp32, or fp16 (KVType::F16:
// half the bytes a decode step reads, rounded to nearest even by fp32_to_fp16; the attention
// arithmetic stays fp32).
enum class KVType { F32, F16 };
// Bytes of physical memory (0 when unknown).
double physical_memory_bytes();
KVType parse_kv_type(const std::string& name);  // "f32" | "f16"; throws std::invalid_argument
const char* kv_type_name(KVType t);

class KVCache {
 public:
  KVCache(const ModelConfig& cfg, int64_t n_seqs, int64_t max_len, KVType type = KVType::F32);
  int64_t n_seqs() const { return n_seqs_; }
  int64_t max_len() const { return max_len_; }
  KVType type() const { return type_; }
  int64_t length(int64_t seq) const;
  void reset(int64_t seq);  // seq < 0: all
  // Keep only the first `length` tokens of a sequence (0 <= length <= length(seq)): the prefix
  // reuse of a server. The positions past it are overwritten by the next tokens fed.
  void truncate(int64_t seq, int64_t length);
  // Element offset of (layer, seq, kv_head)'s rows in the K or V storage.
  int64_t offset(int64_t layer, int64_t seq, int64_t kv_head) const {
    return ((layer * n_seqs_ + seq) * n_kv_ + kv_head) * max_len_ * head_dim_;
  }
  float* k(int64_t layer, int64_t seq, int64_t kv_head) { return k_.data() + offset(layer, seq, kv_head); }
  float* v(int64_t layer, int64_t seq, int64_t kv_head) { return v_.data() + offset(layer, seq, kv_head); }
  uint16_t* k16(int64_t layer, int64_t seq, int64_t kv_head) { return k16_.data() + offset(layer, seq, kv_head); }
  uint16_t* v16(int64_t layer, int64_t seq, int64_t kv_head) { return v16_.data() + offset(layer, seq, kv_head); }
  int64_t bytes() const {
    return static_cast<int64_t>((k_.size() + v_.size()) * sizeof(float) + (k16_.size() + v16_.size()) * sizeof(uint16_t));
  }

 private:
  friend class Model;
  int64_t n_layers_, n_seqs_, n_kv_, head_dim_, max_len_;
  KVType type_;
  std::vector<int64_t> lengths_;
  std::vector<float> k_, v_;         // KVType::F32
  std::vector<uint16_t> k16_, v16_;  // KVType::F16
  std::mutex busy_;  // one forward at a time per cache
};

// A batch of new tokens for some sequences of a cache (ragged: each its own count).
struct Batch {
  std::vector<int64_t> seq_ids;  // cache slots, distinct
  std::vector<int64_t> offsets;  // size seq_ids.size() + 1; tokens of seq i: [offsets[i], offsets[i+1])
  const int32_t* tokens = nullptr;
};

// The checks every engine (CPU, CUDA) makes on a batch against its cache: slots in range and
// distinct, at least one token each, room in the context, token ids inside the vocabulary.
// lengths[s]: tokens slot s already holds. Throws std::invalid_argument naming the problem.
void check_batch_against(const Batch& b, int64_t n_seqs, int64_t max_len, const std::vector<int64_t>& lengths,
                         int64_t vocab_size);

class Model {
 public:
  Model(const ModelConfig& cfg, const TensorMap& tensors, const std::string& isa);

  const ModelConfig& config() const { return cfg_; }
  std::string isa() const { return kernels_->name; }
  int threads() const { return threads_; }
  void set_threads(int n);  // n >= 1

  // Replace the lm_head by a per-row int8 copy (kernels.h quantize_rows_int8) for the rest of this
  // model's life: half the bytes of fp16 per decoded token; its perplexity cost is in bench/README.md.
  void use_int8_lm_head();
  bool int8_lm_head() const { return !lm_head_q8_.empty(); }

  // Bytes of weights read per decoded token (ternary + dense linears + lm_head + one embedding row).
  int64_t weight_bytes_per_token() const;

  // Rows of logits forward() writes: all new tokens, or the last new token of each sequence.
  int64_t logits_rows(const Batch& batch, bool all_logits) const;
  // Checks the batch (throws std::invalid_argument), appends its tokens to the cache and writes
  // logits (logits_rows, vocab) fp32. Safe to call without the GIL.
  void forward(KVCache& cache, const Batch& batch, bool all_logits, float* logits) const;
  void check_batch(const KVCache& cache, const Batch& batch) const;

 private:
  struct MatJob {
    const Linear* lin;
    const QuantRows* xq;  // ternary input
    const float* x;       // dense input (m, lin->in)
    float* y;             // (m, y_stride)
  };
  void run_linears(std::vector<MatJob>& jobs, int64_t m) const;
  Linear lm_head_linear() const;  // the lm_head as a Linear (int8 once use_int8_lm_head() ran)
  // y = lin(x) for several linears sharing the input x (m, in); handles in-layer norms.
  void linears(const std::vector<const Linear*>& lins, const float* x, int64_t m,
               const std::vector<float*>& ys) const;

  ModelConfig cfg_;
  const KernelTable* kernels_;
  int threads_ = 1;
  const void* embed_ = nullptr;  // (vocab, hidden)
  DType embed_dtype_ = DType::F32;
  const void* lm_head_ = nullptr;  // (vocab, hidden), the embedding when tied
  DType lm_head_dtype_ = DType::F32;
  std::vector<int8_t> lm_head_q8_;  // (vocab, hidden) when use_int8_lm_head() was called
  std::vector<float> lm_head_q8_scale_;
  std::vector<float> final_norm_;
  std::vector<Layer> layers_;
  std::vector<float> inv_freq_;  // (head_dim / 2,) RoPE frequencies
};

}  // namespace bitnet
