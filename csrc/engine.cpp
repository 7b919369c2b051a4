// CPU forward pass, op for op as bitnet_train/model.py (BitNetModel) defines it.
#include "engine.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <set>
#include <sstream>
#include <stdexcept>

#include "cpu/parallel.h"

namespace bitnet {
namespace {

[[noreturn]] void fail(const std::string& msg) { throw std::invalid_argument(msg); }

std::string shape_str(const std::vector<int64_t>& s) {
  std::ostringstream o;
  o << "(";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << (s.size() == 1 ? ",)" : ")");
  return o.str();
}

// Hands out named tensors, checking dtype and shape, and remembers which were used.
class TensorTaker {
 public:
  explicit TensorTaker(const TensorMap& t) : t_(t) {}

  bool has(const std::string& name) const { return t_.count(name) != 0; }

  const TensorRef& take(const std::string& name, const std::vector<int64_t>& shape, bool dense_float,
                        const char* what) {
    auto it = t_.find(name);
    if (it == t_.end()) fail("missing tensor '" + name + "' (" + what + ", expected shape " + shape_str(shape) + ")");
    const TensorRef& r = it->second;
    if (dense_float && r.dtype == DType::U8)
      fail("tensor '" + name + "' has dtype u8; expected f32, f16 or bf16 (" + what + ")");
    if (r.shape != shape)
      fail("tensor '" + name + "' has shape " + shape_str(r.shape) + "; expected " + shape_str(shape) + " (" + what + ")");
    if (r.data == nullptr) fail("tensor '" + name + "' has no data");
    used_.insert(name);
    return r;
  }

  std::vector<float> vector_f32(const std::string& name, int64_t n, const char* what) {
    const TensorRef& r = take(name, {n}, true, what);
    std::vector<float> out(static_cast<size_t>(n));
    dense_row_to_fp32(r.data, r.dtype, n, 0, out.data());
    return out;
  }

  void check_all_used() const {
    std::string extra;
    for (const auto& kv : t_)
      if (!used_.count(kv.first)) extra += (extra.empty() ? "" : ", ") + std::string("'") + kv.first + "'";
    if (!extra.empty()) fail("unexpected tensors for this model config: " + extra);
  }

 private:
  const TensorMap& t_;
  std::set<std::string> used_;
};

// A ternary weight buffer still to be checked for invalid bytes (the i2_b128 code 3, the 13 bytes
// that are no t3_b160 encoding): all are scanned at once, in parallel, once the whole model is loaded.
struct CodeScan {
  std::string name;
  const uint8_t* data;
  int64_t bytes;
  Packing packing;
};

Linear load_linear(TensorTaker& t, const ModelConfig& cfg, const std::string& name, int64_t in, int64_t out,
                   std::vector<CodeScan>& scans) {
  Linear lin;
  lin.name = name;
  lin.in = in;
  lin.out = out;
  const bool has_q = t.has(name + ".qweight"), has_w = t.has(name + ".weight");
  if (has_q && has_w) fail("linear '" + name + "' has both '.qweight' (ternary) and '.weight' (dense); expected one");
  if (has_q) {
    lin.ternary = true;
    lin.packing = cfg.packing;
    lin.n_blocks = packing_blocks_per_row(cfg.packing, in);
    const std::string what = std::string(packing_name(cfg.packing)) + " ternary codes";
    const TensorRef& q = t.take(name + ".qweight", {out, lin.n_blocks * 32}, false, what.c_str());
    if (q.dtype != DType::U8) fail("tensor '" + name + ".qweight' has dtype " + dtype_name(q.dtype) + "; expected u8");
    lin.qweight = static_cast<const uint8_t*>(q.data);  // in place: the file's bytes (a memory map)
    scans.push_back({name, lin.qweight, out * lin.n_blocks * 32, cfg.packing});
    const TensorRef& s = t.take(name + ".scale", {1}, true, "ternary weight scale s_w");
    float sw;
    dense_row_to_fp32(s.data, s.dtype, 1, 0, &sw);
    if (!std::isfinite(sw) || sw <= 0.0f)
      fail("tensor '" + name + ".scale' is " + std::to_string(sw) + "; expected a finite s_w > 0");
    lin.s_w = sw;
  } else {
    const TensorRef& w = t.take(name + ".weight", {out, in}, true, "dense linear weight (hybrid precision)");
    lin.dense = w.data;
    lin.dense_dtype = w.dtype;
  }
  if (cfg.norm == NormKind::BitLinear) lin.norm = t.vector_f32(name + ".norm.weight", in, "in-layer RMSNorm weight");
  return lin;
}

// out = w * (x * rsqrt(mean(x^2) + eps)) per row, as model.RMSNorm (fp32).
// The sum of squares in double over 8 interleaved partial sums, added in a fixed order: the same
// value on every ISA and thread count; 8 independent chains instead of one long one. Rows over
// `threads` threads.
void rmsnorm_rows(const float* x, float* out, int64_t m, int64_t n, const float* w, float eps, int threads = 1) {
  parallel_for(m, m > 1 ? threads : 1, [&](int64_t i) {
    const float* xr = x + i * n;
    float* o = out + i * n;
    double ss[8] = {};
    int64_t k = 0;
    for (; k + 8 <= n; k += 8)
      for (int j = 0; j < 8; ++j) ss[j] += static_cast<double>(xr[k + j]) * xr[k + j];
    for (; k < n; ++k) ss[k % 8] += static_cast<double>(xr[k]) * xr[k];
    const double sum = ((ss[0] + ss[1]) + (ss[2] + ss[3])) + ((ss[4] + ss[5]) + (ss[6] + ss[7]));
    const float inv = 1.0f / std::sqrt(static_cast<float>(sum / static_cast<double>(n)) + eps);
    for (k = 0; k < n; ++k) o[k] = w[k] * (xr[k] * inv);
  });
}

// rows (m, bias.size()) += bias, in fp32 as BitLinear adds its bias after the product.
void add_bias_rows(float* rows, int64_t m, const std::vector<float>& bias) {
  const int64_t n = static_cast<int64_t>(bias.size());
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) rows[i * n + j] += bias[static_cast<size_t>(j)];
}

// Every ternary buffer scanned for invalid bytes in 16 MiB pieces over `threads` threads (a 70B
// file holds 17 GB of codes: one thread reading them from the page cache takes ~10 s). Throws for
// the first bad byte in model order, as a sequential scan would.
void check_codes(const std::vector<CodeScan>& scans, int threads) {
  constexpr int64_t kPiece = int64_t{16} << 20;
  struct Piece {
    size_t scan;
    int64_t begin, end;
  };
  std::vector<Piece> pieces;
  for (size_t i = 0; i < scans.size(); ++i)
    for (int64_t b = 0; b < scans[i].bytes; b += kPiece) pieces.push_back({i, b, std::min(scans[i].bytes, b + kPiece)});
  std::vector<int64_t> found(pieces.size(), -1);
  parallel_for(static_cast<int64_t>(pieces.size()), threads, [&](int64_t p) {
    const Piece& pc = pieces[static_cast<size_t>(p)];
    const CodeScan& sc = scans[pc.scan];
    const int64_t at = find_invalid_byte(sc.packing, sc.data + pc.begin, pc.end - pc.begin);
    if (at >= 0) found[static_cast<size_t>(p)] = pc.begin + at;
  });
  for (size_t p = 0; p < pieces.size(); ++p) {
    if (found[p] < 0) continue;
    const CodeScan& sc = scans[pieces[p].scan];
    if (sc.packing == Packing::T3B160)
      fail("tensor '" + sc.name + ".qweight' holds the invalid t3_b160 byte " + std::to_string(sc.data[found[p]]) +
           " at byte " + std::to_string(found[p]) + "; t3_b160 bytes are ceil(256 v / 243) for v = 0 .. 242");
    fail("tensor '" + sc.name + ".qweight' holds the invalid 2-bit code 3 at byte " + std::to_string(found[p]) +
         "; i2_b128 codes are 0, 1, 2 (c + 1)");
  }
}

}  // namespace

void ModelConfig::validate() const {
  const std::pair<const char*, int64_t> sizes[] = {
      {"vocab_size", vocab_size},   {"hidden_size", hidden_size}, {"intermediate_size", intermediate_size},
      {"num_layers", num_layers},   {"num_heads", num_heads},     {"num_kv_heads", num_kv_heads},
      {"head_dim", head_dim},       {"max_seq_len", max_seq_len}};
  for (const auto& s : sizes)
    if (s.second <= 0 || s.second > (int64_t{1} << 31))
      fail(std::string("config ") + s.first + " = " + std::to_string(s.second) + "; expected 1 .. 2^31");
  if (max_seq_len > kMaxSeqLen)
    fail("config max_seq_len = " + std::to_string(max_seq_len) + "; expected at most " + std::to_string(kMaxSeqLen) +
         " (2^20)");
  if (num_heads % num_kv_heads)
    fail("config num_heads " + std::to_string(num_heads) + " is not a multiple of num_kv_heads " +
         std::to_string(num_kv_heads));
  if (head_dim % 2) fail("config head_dim " + std::to_string(head_dim) + " must be even (rotate-half RoPE)");
  if (!(rope_theta > 0.0f) || !std::isfinite(rope_theta)) fail("config rope_theta must be a finite positive number");
  if (!(rms_norm_eps > 0.0f) || !std::isfinite(rms_norm_eps)) fail("config rms_norm_eps must be a finite positive number");
  if (!(act_eps > 0.0f) || !std::isfinite(act_eps)) fail("quant eps must be a finite positive number");
}

double physical_memory_bytes() {
#if defined(_SC_PHYS_PAGES) && defined(_SC_PAGE_SIZE)
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
  if (pages > 0 && page > 0) return static_cast<double>(pages) * static_cast<double>(page);
#endif
  return 0.0;  // unknown: no check
}

KVType parse_kv_type(const std::string& name) {
  if (name == "f32") return KVType::F32;
  if (name == "f16") return KVType::F16;
  throw std::invalid_argument("unknown KV cache dtype '" + name + "'; expected f32 or f16");
}

const char* kv_type_name(KVType t) { return t == KVType::F16 ? "f16" : "f32"; }

KVCache::KVCache(const ModelConfig& cfg, int64_t n_seqs, int64_t max_len, KVType type)
    : n_layers_(cfg.num_layers), n_seqs_(n_seqs), n_kv_(cfg.num_kv_heads), head_dim_(cfg.head_dim), max_len_(max_len),
      type_(type) {
  if (n_seqs < 1 || n_seqs > 65536) fail("KV cache n_seqs = " + std::to_string(n_seqs) + "; expected 1 .. 65536");
  if (max_len < 1 || max_len > cfg.max_seq_len)
    fail("KV cache max_len = " + std::to_string(max_len) + "; expected 1 .. max_seq_len " +
         std::to_string(cfg.max_seq_len));
  // K + V bytes, in floating point first: the factors come from a file and a request, and their
  // product may overflow; refuse what this machine's memory cannot hold before allocating.
  const double elems = static_cast<double>(n_layers_) * n_seqs_ * n_kv_ * max_len_ * head_dim_;
  const double bytes = 2.0 * elems * (type_ == KVType::F16 ? 2 : 4);
  const double ram = physical_memory_bytes();
  if (ram > 0 && bytes > ram)
    fail("a KV cache of " + std::to_string(n_seqs_) + " sequences x " + std::to_string(max_len_) + " tokens needs " +
         std::to_string(static_cast<int64_t>(bytes / (1 << 20))) + " MiB; this machine has " +
         std::to_string(static_cast<int64_t>(ram / (1 << 20))) + " MiB: use fewer sequences or a shorter context");
  const size_t n = static_cast<size_t>(n_layers_ * n_seqs_ * n_kv_ * max_len_ * head_dim_);
  if (type_ == KVType::F16) {
    k16_.assign(n, 0);
    v16_.assign(n, 0);
  } else {
    k_.assign(n, 0.0f);
    v_.assign(n, 0.0f);
  }
  lengths_.assign(static_cast<size_t>(n_seqs), 0);
}

int64_t KVCache::length(int64_t seq) const {
  if (seq < 0 || seq >= n_seqs_) fail("sequence slot " + std::to_string(seq) + " out of range 0 .. " + std::to_string(n_seqs_ - 1));
  return lengths_[static_cast<size_t>(seq)];
}

void KVCache::reset(int64_t seq) {
  std::lock_guard<std::mutex> lock(busy_);
  if (seq < 0) {
    std::fill(lengths_.begin(), lengths_.end(), 0);
    return;
  }
  length(seq);  // range check
  lengths_[static_cast<size_t>(seq)] = 0;
}

void KVCache::truncate(int64_t seq, int64_t length) {
  std::lock_guard<std::mutex> lock(busy_);
  const int64_t held = this->length(seq);  // range check
  if (length < 0 || length > held)
    fail("truncate: sequence slot " + std::to_string(seq) + " holds " + std::to_string(held) + " tokens; cannot keep " +
         std::to_string(length));
  lengths_[static_cast<size_t>(seq)] = length;
}

Model::Model(const ModelConfig& cfg, const TensorMap& tensors, const std::string& isa)
    : cfg_(cfg), kernels_(&select_kernels(isa)), threads_(std::max(1, max_threads())) {
  cfg_.validate();
  const int64_t d = cfg_.hidden_size, f = cfg_.intermediate_size, V = cfg_.vocab_size;
  const int64_t qd = cfg_.num_heads * cfg_.head_dim, kvd = cfg_.num_kv_heads * cfg_.head_dim;
  TensorTaker t(tensors);
  const TensorRef& emb = t.take("embed_tokens.weight", {V, d}, true, "token embedding");
  embed_ = emb.data;
  embed_dtype_ = emb.dtype;
  if (cfg_.tie_embeddings) {
    if (t.has("lm_head.weight")) fail("tie_embeddings is true but the file has 'lm_head.weight'");
    lm_head_ = embed_;
    lm_head_dtype_ = embed_dtype_;
  } else {
    const TensorRef& lm = t.take("lm_head.weight", {V, d}, true, "lm_head");
    lm_head_ = lm.data;
    lm_head_dtype_ = lm.dtype;
  }
  final_norm_ = t.vector_f32("norm.weight", d, "final RMSNorm weight");
  std::vector<CodeScan> scans;
  for (int64_t l = 0; l < cfg_.num_layers; ++l) {
    const std::string p = "layers." + std::to_string(l) + ".";
    Layer L;
    L.input_norm = t.vector_f32(p + "input_layernorm.weight", d, "RMSNorm weight");
    L.post_attention_norm = t.vector_f32(p + "post_attention_layernorm.weight", d, "RMSNorm weight");
    L.q = load_linear(t, cfg_, p + "self_attn.q_proj", d, qd, scans);
    L.k = load_linear(t, cfg_, p + "self_attn.k_proj", d, kvd, scans);
    L.v = load_linear(t, cfg_, p + "self_attn.v_proj", d, kvd, scans);
    L.o = load_linear(t, cfg_, p + "self_attn.o_proj", qd, d, scans);
    L.gate = load_linear(t, cfg_, p + "mlp.gate_proj", d, f, scans);
    L.up = load_linear(t, cfg_, p + "mlp.up_proj", d, f, scans);
    L.down = load_linear(t, cfg_, p + "mlp.down_proj", f, d, scans);
    if (cfg_.qkv_bias) {
      L.q.bias = t.vector_f32(p + "self_attn.q_proj.bias", qd, "q_proj bias");
      L.k.bias = t.vector_f32(p + "self_attn.k_proj.bias", kvd, "k_proj bias");
      L.v.bias = t.vector_f32(p + "self_attn.v_proj.bias", kvd, "v_proj bias");
    }
    if (cfg_.qk_norm) {
      L.q_norm = t.vector_f32(p + "self_attn.q_norm.weight", cfg_.head_dim, "QK-norm weight");
      L.k_norm = t.vector_f32(p + "self_attn.k_norm.weight", cfg_.head_dim, "QK-norm weight");
    }
    if (cfg_.norm == NormKind::SubLN) {
      L.attn_sub_norm = t.vector_f32(p + "self_attn.attn_sub_norm.weight", qd, "SubLN weight");
      L.ffn_sub_norm = t.vector_f32(p + "mlp.ffn_sub_norm.weight", f, "SubLN weight");
    }
    layers_.push_back(std::move(L));
  }
  t.check_all_used();
  check_codes(scans, threads_);

  // RoPE, rotate-half (HF Llama): fp32 as model.rope_cache computes it. The angles are formed per
  // forward for the positions it feeds (rope_angles), so nothing is sized by max_seq_len.
  const int64_t half = cfg_.head_dim / 2;
  inv_freq_.resize(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i) {
    const float expo = static_cast<float>(2 * i) / static_cast<float>(cfg_.head_dim);
    inv_freq_[static_cast<size_t>(i)] = 1.0f / std::pow(cfg_.rope_theta, expo);
  }
}

void Model::set_threads(int n) {
  if (n < 1 || n > 4096) fail("threads = " + std::to_string(n) + "; expected 1 .. 4096");
  threads_ = n;
}

void Model::use_int8_lm_head() {
  if (int8_lm_head()) return;
  const int64_t V = cfg_.vocab_size, d = cfg_.hidden_size;
  std::vector<int8_t> q(static_cast<size_t>(V * d));
  std::vector<float> scale(static_cast<size_t>(V));
  constexpr int64_t chunk = 256;
  parallel_for((V + chunk - 1) / chunk, threads_, [&](int64_t c) {
    const int64_t r0 = c * chunk, r1 = std::min(V, r0 + chunk);
    const auto* base = static_cast<const uint8_t*>(lm_head_) + r0 * d * dtype_size(lm_head_dtype_);
    quantize_rows_int8(base, lm_head_dtype_, r1 - r0, d, q.data() + r0 * d, scale.data() + r0);
  });
  lm_head_q8_ = std::move(q);
  lm_head_q8_scale_ = std::move(scale);
}

Linear Model::lm_head_linear() const {
  Linear head;
  head.name = "lm_head";
  head.in = cfg_.hidden_size;
  head.out = cfg_.vocab_size;
  head.dense = lm_head_;
  head.dense_dtype = lm_head_dtype_;
  if (int8_lm_head()) {
    head.q8 = lm_head_q8_.data();
    head.q8_scale = lm_head_q8_scale_.data();
  }
  return head;
}

int64_t Model::weight_bytes_per_token() const {
  auto lin_bytes = [](const Linear& l) {
    if (l.ternary) return l.out * l.n_blocks * 32 + 4;
    if (l.q8) return l.out * (l.in + 4);
    return l.out * l.in * dtype_size(l.dense_dtype);
  };
  int64_t total = lin_bytes(lm_head_linear()) + cfg_.hidden_size * dtype_size(embed_dtype_);
  for (const Layer& L : layers_)
    for (const Linear* l : {&L.q, &L.k, &L.v, &L.o, &L.gate, &L.up, &L.down}) total += lin_bytes(*l);
  return total;
}

int64_t Model::logits_rows(const Batch& batch, bool all_logits) const {
  if (batch.offsets.empty()) return 0;
  return all_logits ? batch.offsets.back() : static_cast<int64_t>(batch.seq_ids.size());
}

void check_batch_against(const Batch& b, int64_t n_seqs, int64_t max_len, const std::vector<int64_t>& lengths,
                         int64_t vocab_size) {
  const size_t n = b.seq_ids.size();
  if (n == 0) fail("empty batch: expected at least one sequence");
  if (b.offsets.size() != n + 1 || b.offsets[0] != 0)
    fail("batch offsets must have len(seq_ids) + 1 entries starting at 0");
  std::set<int64_t> seen;
  for (size_t i = 0; i < n; ++i) {
    const int64_t s = b.seq_ids[i];
    if (s < 0 || s >= n_seqs)
      fail("sequence slot " + std::to_string(s) + " out of range 0 .. " + std::to_string(n_seqs - 1));
    if (!seen.insert(s).second) fail("sequence slot " + std::to_string(s) + " appears twice in one batch");
    const int64_t count = b.offsets[i + 1] - b.offsets[i];
    if (count < 1) fail("sequence slot " + std::to_string(s) + " has no new tokens");
    const int64_t have = lengths[static_cast<size_t>(s)];
    if (have + count > max_len)
      fail("sequence slot " + std::to_string(s) + " holds " + std::to_string(have) + " tokens; adding " +
           std::to_string(count) + " exceeds the context of " + std::to_string(max_len) + " positions");
  }
  const int64_t total = b.offsets.back();
  if (total > 0 && b.tokens == nullptr) fail("batch has no token data");
  for (int64_t i = 0; i < total; ++i)
    if (b.tokens[i] < 0 || b.tokens[i] >= vocab_size)
      fail("token id " + std::to_string(b.tokens[i]) + " at index " + std::to_string(i) + " outside the vocabulary 0 .. " +
           std::to_string(vocab_size - 1));
}

void Model::check_batch(const KVCache& cache, const Batch& b) const {
  if (cache.n_layers_ != cfg_.num_layers || cache.n_kv_ != cfg_.num_kv_heads || cache.head_dim_ != cfg_.head_dim)
    fail("KV cache was made for another model config");
  check_batch_against(b, cache.n_seqs_, cache.max_len_, cache.lengths_, cfg_.vocab_size);
}

void Model::run_linears(std::vector<MatJob>& jobs, int64_t m) const {
  struct Task {
    const MatJob* job;
    int64_t r0, r1;
  };
  std::vector<Task> tasks;
  for (const MatJob& j : jobs) {
    const int64_t chunk = j.lin->ternary ? 32 : 16;
    for (int64_t r = 0; r < j.lin->out; r += chunk) tasks.push_back({&j, r, std::min(j.lin->out, r + chunk)});
  }
  const KernelTable& kt = *kernels_;
  parallel_for(static_cast<int64_t>(tasks.size()), threads_, [&](int64_t ti) {
    const Task& t = tasks[static_cast<size_t>(ti)];
    const Linear& l = *t.job->lin;
    if (l.ternary)
      (l.packing == Packing::T3B160 ? kt.ternary_rows_t3 : kt.ternary_rows)(l.qweight, l.n_blocks, t.r0, t.r1,
                                                                            *t.job->xq, l.s_w, t.job->y, l.out);
    else if (l.q8)
      kt.int8_rows(l.q8, l.q8_scale, l.in, t.r0, t.r1, t.job->x, m, l.in, t.job->y, l.out);
    else
      kt.dense_rows(l.dense, l.dense_dtype, l.in, t.r0, t.r1, t.job->x, m, l.in, t.job->y, l.out);
  }, /*guided=*/true);  // static shares left each thread waiting ~10% of a decode step
}

void Model::linears(const std::vector<const Linear*>& lins, const float* x, int64_t m,
                    const std::vector<float*>& ys) const {
  const int64_t in = lins[0]->in;
  const bool in_layer_norm = cfg_.norm == NormKind::BitLinear;
  const size_t n = lins.size();
  // BitLinear: each linear normalises and quantises its own input; otherwise one shared input.
  std::vector<std::vector<float>> normed(in_layer_norm ? n : 0);
  std::vector<QuantBuffer> qbuf(in_layer_norm ? n : 1);
  std::vector<QuantRows> qrows(qbuf.size());
  std::vector<MatJob> jobs;
  bool shared_quantized = false;
  for (size_t i = 0; i < n; ++i) {
    const Linear& l = *lins[i];
    const float* xin = x;
    if (in_layer_norm) {
      normed[i].resize(static_cast<size_t>(m * in));
      rmsnorm_rows(x, normed[i].data(), m, in, l.norm.data(), cfg_.rms_norm_eps, threads_);
      xin = normed[i].data();
    }
    const size_t qi = in_layer_norm ? i : 0;
    if (l.ternary && (in_layer_norm || !shared_quantized)) {
      qbuf[qi].resize(m, in);
      QuantBuffer& qb = qbuf[qi];
      parallel_for(m, m > 1 ? threads_ : 1, [&](int64_t r) {  // rows are independent (prefill, batches)
        kernels_->quantize_rows(xin + r * in, 1, in, in, cfg_.act_eps, qb.q() + r * qb.stride(), qb.stride(),
                                qb.scale() + r, qb.sum() + r);
      });
      qb.pack(*kernels_);  // the AMX kernels' tile order, once for all row chunks (other tables: nothing)
      qrows[qi] = qb.view();
      shared_quantized = true;
    }
    jobs.push_back({&l, &qrows[qi], xin, ys[i]});
  }
  run_linears(jobs, m);
}

void Model::forward(KVCache& cache, const Batch& b, bool all_logits, float* logits) const {
  std::unique_lock<std::mutex> lock(cache.busy_, std::try_to_lock);
  if (!lock.owns_lock()) throw std::runtime_error("KV cache is in use by another forward call");
  check_batch(cache, b);
  const int64_t N = b.offsets.back();
  const int64_t d = cfg_.hidden_size, f = cfg_.intermediate_size, hd = cfg_.head_dim, half = hd / 2;
  const int64_t nh = cfg_.num_heads, nkv = cfg_.num_kv_heads, qd = nh * hd, kvd = nkv * hd;
  const int64_t group = nh / nkv;

  std::vector<int64_t> tok_seq(static_cast<size_t>(N)), tok_pos(static_cast<size_t>(N));
  for (size_t i = 0; i + 1 < b.offsets.size(); ++i)
    for (int64_t t = b.offsets[i]; t < b.offsets[i + 1]; ++t) {
      tok_seq[t] = b.seq_ids[i];
      tok_pos[t] = cache.lengths_[static_cast<size_t>(b.seq_ids[i])] + (t - b.offsets[i]);
    }

  std::vector<float> x(N * d), h(N * d), o(N * d), q(N * qd), k(N * kvd), v(N * kvd), att(N * qd), g(N * f), u(N * f);
  for (int64_t t = 0; t < N; ++t) dense_row_to_fp32(embed_, embed_dtype_, d, b.tokens[t], x.data() + t * d);

  std::vector<float> rope_cos(static_cast<size_t>(N * half)), rope_sin(rope_cos.size());  // (N, half)
  for (int64_t t = 0; t < N; ++t)
    for (int64_t i = 0; i < half; ++i) {
      const float a = static_cast<float>(tok_pos[t]) * inv_freq_[static_cast<size_t>(i)];
      rope_cos[t * half + i] = std::cos(a);
      rope_sin[t * half + i] = std::sin(a);
    }
  auto rope = [&](float* rows, int64_t heads, int64_t t) {  // rows: (N, heads * hd); token t's heads
    const float* c = rope_cos.data() + t * half;
    const float* s = rope_sin.data() + t * half;
    for (int64_t hh = 0; hh < heads; ++hh) {
      float* r = rows + (t * heads + hh) * hd;
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = r[i], x2 = r[i + half];
        r[i] = x1 * c[i] - x2 * s[i];
        r[i + half] = x2 * c[i] + x1 * s[i];
      }
    }
  };
  const float attn_scale = 1.0f / std::sqrt(static_cast<float>(hd));

  for (int64_t l = 0; l < cfg_.num_layers; ++l) {
    const Layer& L = layers_[static_cast<size_t>(l)];
    // attention
    rmsnorm_rows(x.data(), h.data(), N, d, L.input_norm.data(), cfg_.rms_norm_eps, threads_);
    linears({&L.q, &L.k, &L.v}, h.data(), N, {q.data(), k.data(), v.data()});
    if (cfg_.qkv_bias) {
      add_bias_rows(q.data(), N, L.q.bias);
      add_bias_rows(k.data(), N, L.k.bias);
      add_bias_rows(v.data(), N, L.v.bias);
    }
    if (cfg_.qk_norm) {  // each head's row of head_dim is one RMSNorm row
      rmsnorm_rows(q.data(), q.data(), N * nh, hd, L.q_norm.data(), cfg_.rms_norm_eps, threads_);
      rmsnorm_rows(k.data(), k.data(), N * nkv, hd, L.k_norm.data(), cfg_.rms_norm_eps, threads_);
    }
    const bool kv16 = cache.type() == KVType::F16;
    parallel_for(N, N > 1 ? threads_ : 1, [&](int64_t t) {  // RoPE, then K and V into the cache
      rope(q.data(), nh, t);
      rope(k.data(), nkv, t);
      for (int64_t kh = 0; kh < nkv; ++kh) {
        const float* kr = k.data() + (t * nkv + kh) * hd;
        const float* vr = v.data() + (t * nkv + kh) * hd;
        if (kv16) {
          uint16_t* kd = cache.k16(l, tok_seq[t], kh) + tok_pos[t] * hd;
          uint16_t* vd = cache.v16(l, tok_seq[t], kh) + tok_pos[t] * hd;
          kernels_->to_fp16(kr, hd, kd);
          kernels_->to_fp16(vr, hd, vd);
        } else {
          std::copy_n(kr, hd, cache.k(l, tok_seq[t], kh) + tok_pos[t] * hd);
          std::copy_n(vr, hd, cache.v(l, tok_seq[t], kh) + tok_pos[t] * hd);
        }
      }
    });
    // head-major: each thread's share holds every position (causal rows grow with t; token-major
    // shares gave the last thread ~3x the first's work in a prefill)
    parallel_for(N * nh, threads_, [&](int64_t task) {
      const int64_t t = task % N, hh = task / N, kh = hh / group, pos = tok_pos[t];
      const float* qv = q.data() + (t * nh + hh) * hd;
      thread_local std::vector<float> scores;
      scores.resize(static_cast<size_t>(pos + 1));
      float* out = att.data() + (t * nh + hh) * hd;
      // causal: positions 0 .. pos of this sequence
      if (kv16)
        kernels_->attend_f16(qv, cache.k16(l, tok_seq[t], kh), cache.v16(l, tok_seq[t], kh), pos + 1, hd, attn_scale,
                             scores.data(), out);
      else
        kernels_->attend(qv, cache.k(l, tok_seq[t], kh), cache.v(l, tok_seq[t], kh), pos + 1, hd, attn_scale,
                         scores.data(), out);
    });
    if (cfg_.norm == NormKind::SubLN) rmsnorm_rows(att.data(), att.data(), N, qd, L.attn_sub_norm.data(), cfg_.rms_norm_eps, threads_);
    linears({&L.o}, att.data(), N, {o.data()});
    for (int64_t i = 0; i < N * d; ++i) x[i] += o[i];

    // feed-forward
    rmsnorm_rows(x.data(), h.data(), N, d, L.post_attention_norm.data(), cfg_.rms_norm_eps, threads_);
    linears({&L.gate, &L.up}, h.data(), N, {g.data(), u.data()});
    parallel_for(N, N > 1 ? threads_ : 1, [&](int64_t t) {
      float* gr = g.data() + t * f;
      const float* ur = u.data() + t * f;
      if (cfg_.ffn == FfnKind::SwiGLU) {
        for (int64_t i = 0; i < f; ++i) gr[i] = gr[i] / (1.0f + std::exp(-gr[i])) * ur[i];
      } else {
        for (int64_t i = 0; i < f; ++i) {
          const float r = std::max(gr[i], 0.0f);
          gr[i] = r * r * ur[i];
        }
      }
    });
    if (cfg_.norm == NormKind::SubLN) rmsnorm_rows(g.data(), g.data(), N, f, L.ffn_sub_norm.data(), cfg_.rms_norm_eps, threads_);
    linears({&L.down}, g.data(), N, {o.data()});
    for (int64_t i = 0; i < N * d; ++i) x[i] += o[i];
  }
  for (size_t i = 0; i < b.seq_ids.size(); ++i)
    cache.lengths_[static_cast<size_t>(b.seq_ids[i])] += b.offsets[i + 1] - b.offsets[i];

  // final norm + lm_head on the rows asked for
  const int64_t R = logits_rows(b, all_logits);
  std::vector<float> hn(R * d);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t t = all_logits ? r : b.offsets[static_cast<size_t>(r) + 1] - 1;
    rmsnorm_rows(x.data() + t * d, hn.data() + r * d, 1, d, final_norm_.data(), cfg_.rms_norm_eps);
  }
  const Linear head = lm_head_linear();
  std::vector<MatJob> jobs{{&head, nullptr, hn.data(), logits}};
  run_linears(jobs, R);
}

}  // namespace bitnet
