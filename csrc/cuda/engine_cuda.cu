// CUDA engine: loading, device buffers, the forward pass as a sequence of kernel launches on one
// stream, and greedy decoding replayed from a CUDA graph. Op order follows csrc/engine.cpp.
#include "cuda/engine_cuda.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "cuda/kernels.cuh"

namespace bitnet {
namespace cuda {
namespace {

[[noreturn]] void fail(const std::string& msg) { throw std::invalid_argument(msg); }

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("CUDA error in ") + what + ": " + cudaGetErrorString(e));
}
#define BITNET_CUDA_CHECK(expr) check((expr), #expr)

// Owning device allocation; grows, never shrinks.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  ~DeviceBuffer() { release(); }
  DeviceBuffer(DeviceBuffer&& o) noexcept : p_(std::exchange(o.p_, nullptr)), cap_(std::exchange(o.cap_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&&) = delete;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  void reserve(size_t bytes) {
    if (bytes <= cap_) return;
    release();
    BITNET_CUDA_CHECK(cudaMalloc(&p_, std::max<size_t>(bytes, 16)));
    cap_ = bytes;
  }
  void upload(const void* src, size_t bytes) {
    reserve(bytes);
    BITNET_CUDA_CHECK(cudaMemcpy(p_, src, bytes, cudaMemcpyHostToDevice));
  }
  template <typename T>
  T* as() const { return static_cast<T*>(p_); }

 private:
  void release() {
    if (p_) cudaFree(p_);
    p_ = nullptr;
    cap_ = 0;
  }
  void* p_ = nullptr;
  size_t cap_ = 0;
};

// Makes `device` current for a scope (calls may come from any host thread).
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    cudaGetDevice(&prev_);
    BITNET_CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceScope() { cudaSetDevice(prev_); }

 private:
  int prev_ = 0;
};

int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

const TensorRef& tensor(const TensorMap& t, const std::string& name) {
  auto it = t.find(name);
  if (it == t.end()) fail("missing tensor '" + name + "'");  // unreachable after CPU validation
  return it->second;
}

}  // namespace

// ---- devices ------------------------------------------------------------------------------------

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return 0;
  }
  return n;
}

std::string device_name(int device) {
  cudaDeviceProp p{};
  BITNET_CUDA_CHECK(cudaGetDeviceProperties(&p, device));
  return std::string(p.name) + " (sm_" + std::to_string(p.major) + std::to_string(p.minor) + ", " +
         std::to_string(p.multiProcessorCount) + " SMs, " +
         std::to_string(static_cast<int>(std::lround(static_cast<double>(p.totalGlobalMem) / (1 << 30)))) + " GiB)";
}

void require_device(int device) {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(std::string("no CUDA device found (") + cudaGetErrorString(e) + ")");
  }
  if (n == 0) throw std::runtime_error("no CUDA device found");
  if (device < 0 || device >= n)
    fail("CUDA device " + std::to_string(device) + " does not exist; this machine has " + std::to_string(n) +
         " (0 .. " + std::to_string(n - 1) + ")");
  cudaDeviceProp p{};
  BITNET_CUDA_CHECK(cudaGetDeviceProperties(&p, device));
  if (p.major < 8)
    throw std::runtime_error("CUDA device " + std::to_string(device) + " is " + device_name(device) +
                             "; the CUDA engine needs compute capability 8.0 or newer");
}

// ---- KV cache -----------------------------------------------------------------------------------

struct DeviceKVCache::Impl {
  int device = 0;
  int64_t n_layers = 0, n_seqs = 0, n_kv = 0, head_dim = 0, max_len = 0;
  std::vector<int64_t> lengths;
  DeviceBuffer k, v;
  std::mutex busy;  // one forward at a time per cache

  int64_t layer_elems() const { return n_seqs * n_kv * max_len * head_dim; }
  CacheView view(int64_t layer) const {
    CacheView c;
    c.k = k.as<float>() + layer * layer_elems();
    c.v = v.as<float>() + layer * layer_elems();
    c.n_kv = n_kv;
    c.max_len = max_len;
    c.hd = head_dim;
    return c;
  }
};

DeviceKVCache::DeviceKVCache(const ModelConfig& cfg, int device, int64_t n_seqs, int64_t max_len)
    : impl_(std::make_unique<Impl>()) {
  if (n_seqs < 1 || n_seqs > 65536) fail("KV cache n_seqs = " + std::to_string(n_seqs) + "; expected 1 .. 65536");
  if (max_len < 1 || max_len > cfg.max_seq_len)
    fail("KV cache max_len = " + std::to_string(max_len) + "; expected 1 .. max_seq_len " + std::to_string(cfg.max_seq_len));
  Impl& c = *impl_;
  c.device = device;
  c.n_layers = cfg.num_layers;
  c.n_seqs = n_seqs;
  c.n_kv = cfg.num_kv_heads;
  c.head_dim = cfg.head_dim;
  c.max_len = max_len;
  c.lengths.assign(static_cast<size_t>(n_seqs), 0);
  DeviceScope scope(device);
  const size_t bytes = static_cast<size_t>(c.n_layers * c.layer_elems()) * sizeof(float);
  c.k.reserve(bytes);
  c.v.reserve(bytes);
  BITNET_CUDA_CHECK(cudaMemset(c.k.as<void>(), 0, bytes));
  BITNET_CUDA_CHECK(cudaMemset(c.v.as<void>(), 0, bytes));
}

DeviceKVCache::~DeviceKVCache() {
  if (impl_) {
    cudaSetDevice(impl_->device);
  }
}

int64_t DeviceKVCache::n_seqs() const { return impl_->n_seqs; }
int64_t DeviceKVCache::max_len() const { return impl_->max_len; }
int64_t DeviceKVCache::bytes() const { return 2 * impl_->n_layers * impl_->layer_elems() * static_cast<int64_t>(sizeof(float)); }

int64_t DeviceKVCache::length(int64_t seq) const {
  if (seq < 0 || seq >= impl_->n_seqs)
    fail("sequence slot " + std::to_string(seq) + " out of range 0 .. " + std::to_string(impl_->n_seqs - 1));
  return impl_->lengths[static_cast<size_t>(seq)];
}

void DeviceKVCache::reset(int64_t seq) {
  std::lock_guard<std::mutex> lock(impl_->busy);
  if (seq < 0) {
    std::fill(impl_->lengths.begin(), impl_->lengths.end(), 0);
    return;
  }
  length(seq);  // range check
  impl_->lengths[static_cast<size_t>(seq)] = 0;
}

void DeviceKVCache::truncate(int64_t seq, int64_t length) {
  std::lock_guard<std::mutex> lock(impl_->busy);
  const int64_t held = this->length(seq);  // range check
  if (length < 0 || length > held)
    fail("truncate: sequence slot " + std::to_string(seq) + " holds " + std::to_string(held) + " tokens; cannot keep " +
         std::to_string(length));
  impl_->lengths[static_cast<size_t>(seq)] = length;
}

// ---- model --------------------------------------------------------------------------------------

namespace {

struct DevLinear {
  bool ternary = false;
  int64_t in = 0, out = 0, n_blocks = 0;
  float s_w = 0.0f;
  DeviceBuffer w;  // i2_b128 (out, n_blocks * 32; t3_b160 files repacked at upload) or dense (out, in) of dtype dt
  DType dt = DType::U8;
  DeviceBuffer norm;  // in-layer RMSNorm weight (norm == "bitlinear")
  bool has_norm = false;
  DeviceBuffer bias;  // (out) fp32 (qkv_bias)
};

struct DevLayer {
  DeviceBuffer input_norm, post_attention_norm, attn_sub_norm, ffn_sub_norm;
  DeviceBuffer q_norm, k_norm;  // (head_dim) qk_norm
  DevLinear q, k, v, o, gate, up, down;
};

// What one linear reads: quantized rows (ternary) or fp32 rows (dense).
struct LinInput {
  QuantView q;
  const float* x = nullptr;
};

}  // namespace

struct DeviceModel::Impl {
  ModelConfig cfg;
  int device = 0;
  std::string name;
  int64_t weight_bytes = 0, device_bytes = 0;
  cudaStream_t stream = nullptr;
  DeviceBuffer embed, lm_head, final_norm, rope_cos, rope_sin;
  DType embed_dt = DType::F32, head_dt = DType::F32;
  std::vector<DevLayer> layers;

  // workspace for up to cap_tokens tokens and cap_rows logits rows (grown outside graph capture)
  std::mutex mu;
  int64_t cap_tokens = 0, cap_rows = 0, cap_steps = 0, max_dim = 0, q_stride = 0;
  DeviceBuffer x, q, k, v, att, g, u, hn, logits;
  DeviceBuffer hf[4], xq[3], sx[3], xsum[3];
  DeviceBuffer tokens, tok_seq, tok_pos, rows, step, out;

  ~Impl() {
    if (stream) {
      cudaSetDevice(device);
      cudaStreamDestroy(stream);
    }
  }

  void upload_linear(const TensorMap& t, const std::string& name, int64_t in, int64_t out, DevLinear& lin) {
    lin.in = in;
    lin.out = out;
    if (t.count(name + ".qweight")) {
      lin.ternary = true;
      lin.n_blocks = (in + 127) / 128;
      const TensorRef& qw = tensor(t, name + ".qweight");
      const size_t bytes = static_cast<size_t>(out * lin.n_blocks * 32);
      if (cfg.packing == Packing::T3B160) {
        // The GPU kernels read i2_b128: a 1.6-bit matrix is repacked on the host, one tensor at a
        // time (a transient host copy of that tensor only), and the device holds 2 bits per weight.
        std::vector<uint8_t> i2(bytes);
        repack_t3_b160_to_i2_b128(static_cast<const uint8_t*>(qw.data), out, in, i2.data());
        lin.w.upload(i2.data(), bytes);
        weight_bytes += static_cast<int64_t>(bytes) - out * t3_row_bytes(in);  // what a decode step reads here
      } else {
        lin.w.upload(qw.data, bytes);
      }
      device_bytes += static_cast<int64_t>(bytes);
      const TensorRef& s = tensor(t, name + ".scale");
      dense_row_to_fp32(s.data, s.dtype, 1, 0, &lin.s_w);
    } else {
      const TensorRef& w = tensor(t, name + ".weight");
      lin.dt = w.dtype;
      const size_t bytes = static_cast<size_t>(out * in * dtype_size(w.dtype));
      lin.w.upload(w.data, bytes);
      device_bytes += static_cast<int64_t>(bytes);
    }
    if (cfg.norm == NormKind::BitLinear) {
      upload_vector(t, name + ".norm.weight", in, lin.norm);
      lin.has_norm = true;
    }
  }

  void upload_vector(const TensorMap& t, const std::string& name, int64_t n, DeviceBuffer& dst) {
    const TensorRef& r = tensor(t, name);
    std::vector<float> f(static_cast<size_t>(n));
    dense_row_to_fp32(r.data, r.dtype, n, 0, f.data());
    dst.upload(f.data(), f.size() * sizeof(float));
  }

  void ensure_workspace(int64_t n_tokens, int64_t n_rows, int64_t n_steps) {
    const ModelConfig& c = cfg;
    const int64_t d = c.hidden_size, f = c.intermediate_size, qd = c.num_heads * c.head_dim;
    const int64_t kvd = c.num_kv_heads * c.head_dim;
    max_dim = std::max({d, f, qd});
    q_stride = round_up(max_dim, 128);
    if (n_tokens > cap_tokens) {
      const size_t N = static_cast<size_t>(n_tokens), fl = sizeof(float);
      x.reserve(N * d * fl);
      q.reserve(N * qd * fl);
      k.reserve(N * kvd * fl);
      v.reserve(N * kvd * fl);
      att.reserve(N * qd * fl);
      g.reserve(N * f * fl);
      u.reserve(N * f * fl);
      for (auto& b : hf) b.reserve(N * max_dim * fl);
      for (int i = 0; i < 3; ++i) {
        xq[i].reserve(N * q_stride);
        sx[i].reserve(N * fl);
        xsum[i].reserve(N * sizeof(int32_t));
      }
      tokens.reserve(N * sizeof(int32_t));
      tok_seq.reserve(N * sizeof(int32_t));
      tok_pos.reserve(N * sizeof(int32_t));
      cap_tokens = n_tokens;
    }
    if (n_rows > cap_rows) {
      rows.reserve(static_cast<size_t>(n_rows) * sizeof(int32_t));
      hn.reserve(static_cast<size_t>(n_rows * d) * sizeof(float));
      logits.reserve(static_cast<size_t>(n_rows * c.vocab_size) * sizeof(float));
      cap_rows = n_rows;
    }
    step.reserve(sizeof(int32_t));
    if (n_steps > cap_steps) {
      out.reserve(static_cast<size_t>(n_steps * std::max<int64_t>(n_tokens, 1)) * sizeof(int32_t));
      cap_steps = n_steps;
    }
  }

  // Normalise / activate / quantise the input rows of linears that share one input (n rows).
  // a, b, act, norm_w: as launch_row_prep. BitLinear models then apply each linear's own norm.
  std::vector<LinInput> prepare(const std::vector<const DevLinear*>& lins, int64_t n, const float* a, const float* b,
                                Act act, const DeviceBuffer* norm_w) {
    const int64_t in = lins[0]->in;
    const float eps = cfg.rms_norm_eps, act_eps = cfg.act_eps;
    const float* nw = norm_w ? norm_w->as<float>() : nullptr;
    std::vector<LinInput> inputs(lins.size());
    if (cfg.norm != NormKind::BitLinear) {
      bool any_dense = false, any_ternary = false;
      for (const DevLinear* l : lins) (l->ternary ? any_ternary : any_dense) = true;
      float* of = (any_dense && (nw || act != Act::None)) ? hf[0].as<float>() : nullptr;
      int8_t* qb = any_ternary ? xq[0].as<int8_t>() : nullptr;
      if (of || qb)
        launch_row_prep(a, b, act, nullptr, n, in, nw, eps, of, qb, q_stride, sx[0].as<float>(), xsum[0].as<int32_t>(),
                        act_eps, stream);
      for (LinInput& li : inputs) {
        li.q = {qb, q_stride, sx[0].as<float>(), xsum[0].as<int32_t>()};
        li.x = of ? of : a;
      }
      return inputs;
    }
    const float* base = a;
    if (nw || act != Act::None) {
      launch_row_prep(a, b, act, nullptr, n, in, nw, eps, hf[0].as<float>(), nullptr, 0, nullptr, nullptr, act_eps, stream);
      base = hf[0].as<float>();
    }
    for (size_t i = 0; i < lins.size(); ++i) {
      const DevLinear& l = *lins[i];
      float* of = l.ternary ? nullptr : hf[i + 1].as<float>();
      int8_t* qb = l.ternary ? xq[i].as<int8_t>() : nullptr;
      launch_row_prep(base, nullptr, Act::None, nullptr, n, in, l.norm.as<float>(), eps, of, qb, q_stride,
                      sx[i].as<float>(), xsum[i].as<int32_t>(), act_eps, stream);
      inputs[i].q = {qb, q_stride, sx[i].as<float>(), xsum[i].as<int32_t>()};
      inputs[i].x = of;
    }
    return inputs;
  }

  // ys[i] (n, lins[i]->out) (+)= lins[i](inputs[i]); the ternary ones in one launch.
  void linears(const std::vector<const DevLinear*>& lins, const std::vector<LinInput>& inputs,
               const std::vector<float*>& ys, int64_t n, bool accumulate) {
    TernaryJob jobs[kMaxJobs];
    int n_jobs = 0;
    for (size_t i = 0; i < lins.size(); ++i) {
      const DevLinear& l = *lins[i];
      if (l.ternary) {
        TernaryJob& j = jobs[n_jobs++];
        j.w = l.w.as<uint8_t>();
        j.out = l.out;
        j.s_w = l.s_w;
        j.x = inputs[i].q;
        j.y = ys[i];
        j.y_stride = l.out;
        j.accumulate = accumulate;
      } else {
        launch_dense(l.w.as<void>(), l.dt, l.out, l.in, inputs[i].x, n, ys[i], l.out, accumulate, stream);
      }
    }
    if (n_jobs) launch_ternary(jobs, n_jobs, lins[0]->n_blocks, n, stream);
  }

  // The forward pass for n tokens already in tokens / tok_seq / tok_pos; logits for n_rows rows
  // (row_map: their token indices, device memory; null: all n tokens).
  void enqueue_forward(const DeviceKVCache::Impl& cache, int64_t n, int64_t n_rows, const int32_t* row_map) {
    const ModelConfig& c = cfg;
    const int64_t d = c.hidden_size, nh = c.num_heads;
    const Act act = c.ffn == FfnKind::SwiGLU ? Act::SwiGLU : Act::ReLU2;
    const bool subln = c.norm == NormKind::SubLN;
    float* xb = x.as<float>();
    launch_embed(embed.as<void>(), embed_dt, d, tokens.as<int32_t>(), n, xb, stream);
    for (int64_t l = 0; l < c.num_layers; ++l) {
      DevLayer& L = layers[static_cast<size_t>(l)];
      // attention
      auto in_qkv = prepare({&L.q, &L.k, &L.v}, n, xb, nullptr, Act::None, &L.input_norm);
      linears({&L.q, &L.k, &L.v}, in_qkv, {q.as<float>(), k.as<float>(), v.as<float>()}, n, false);
      if (c.qkv_bias) {
        launch_add_bias(q.as<float>(), L.q.bias.as<float>(), n, L.q.out, stream);
        launch_add_bias(k.as<float>(), L.k.bias.as<float>(), n, L.k.out, stream);
        launch_add_bias(v.as<float>(), L.v.bias.as<float>(), n, L.v.out, stream);
      }
      float *qr = q.as<float>(), *kr = k.as<float>();
      if (c.qk_norm) {  // one RMSNorm row per (token, head), into the free row buffers hf[0], hf[1]
        launch_row_prep(qr, nullptr, Act::None, nullptr, n * nh, c.head_dim, L.q_norm.as<float>(), c.rms_norm_eps,
                        hf[0].as<float>(), nullptr, 0, nullptr, nullptr, c.act_eps, stream);
        launch_row_prep(kr, nullptr, Act::None, nullptr, n * c.num_kv_heads, c.head_dim, L.k_norm.as<float>(),
                        c.rms_norm_eps, hf[1].as<float>(), nullptr, 0, nullptr, nullptr, c.act_eps, stream);
        qr = hf[0].as<float>();
        kr = hf[1].as<float>();
      }
      const CacheView cv = cache.view(l);
      launch_rope_store(qr, kr, v.as<float>(), n, nh, cv, rope_cos.as<float>(), rope_sin.as<float>(),
                        tok_seq.as<int32_t>(), tok_pos.as<int32_t>(), stream);
      launch_attention(qr, cv, n, nh, tok_seq.as<int32_t>(), tok_pos.as<int32_t>(), att.as<float>(), stream);
      auto in_o = prepare({&L.o}, n, att.as<float>(), nullptr, Act::None, subln ? &L.attn_sub_norm : nullptr);
      linears({&L.o}, in_o, {xb}, n, true);  // x += o_proj(...)
      // feed-forward
      auto in_gu = prepare({&L.gate, &L.up}, n, xb, nullptr, Act::None, &L.post_attention_norm);
      linears({&L.gate, &L.up}, in_gu, {g.as<float>(), u.as<float>()}, n, false);
      auto in_down = prepare({&L.down}, n, g.as<float>(), u.as<float>(), act, subln ? &L.ffn_sub_norm : nullptr);
      linears({&L.down}, in_down, {xb}, n, true);  // x += down_proj(...)
    }
    launch_row_prep(xb, nullptr, Act::None, row_map, n_rows, d, final_norm.as<float>(), c.rms_norm_eps, hn.as<float>(),
                    nullptr, 0, nullptr, nullptr, c.act_eps, stream);
    launch_dense(lm_head.as<void>(), head_dt, c.vocab_size, d, hn.as<float>(), n_rows, logits.as<float>(), c.vocab_size,
                 false, stream);
  }
};

DeviceModel::DeviceModel(const ModelConfig& cfg, const TensorMap& tensors, int device) : impl_(std::make_unique<Impl>()) {
  require_device(device);
  // Validation (names, dtypes, shapes, codes, scales) is the CPU loader's: same checks, same messages.
  const Model host(cfg, tensors, "scalar");
  Impl& m = *impl_;
  m.cfg = host.config();
  m.device = device;
  m.weight_bytes = host.weight_bytes_per_token();
  DeviceScope scope(device);
  m.name = cuda::device_name(device);
  int smem_optin = 0;
  BITNET_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  configure_kernels(smem_optin);
  BITNET_CUDA_CHECK(cudaStreamCreateWithFlags(&m.stream, cudaStreamNonBlocking));

  const ModelConfig& c = m.cfg;
  const int64_t d = c.hidden_size, f = c.intermediate_size, V = c.vocab_size;
  const int64_t qd = c.num_heads * c.head_dim, kvd = c.num_kv_heads * c.head_dim;
  const TensorRef& emb = tensor(tensors, "embed_tokens.weight");
  m.embed_dt = emb.dtype;
  m.embed.upload(emb.data, static_cast<size_t>(V * d * dtype_size(emb.dtype)));
  m.device_bytes += V * d * dtype_size(emb.dtype);
  const TensorRef& head = c.tie_embeddings ? emb : tensor(tensors, "lm_head.weight");
  m.head_dt = head.dtype;
  m.lm_head.upload(head.data, static_cast<size_t>(V * d * dtype_size(head.dtype)));  // tied: a second copy, simpler
  m.device_bytes += V * d * dtype_size(head.dtype);
  m.upload_vector(tensors, "norm.weight", d, m.final_norm);
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const std::string p = "layers." + std::to_string(l) + ".";
    DevLayer L;
    m.upload_vector(tensors, p + "input_layernorm.weight", d, L.input_norm);
    m.upload_vector(tensors, p + "post_attention_layernorm.weight", d, L.post_attention_norm);
    m.upload_linear(tensors, p + "self_attn.q_proj", d, qd, L.q);
    m.upload_linear(tensors, p + "self_attn.k_proj", d, kvd, L.k);
    m.upload_linear(tensors, p + "self_attn.v_proj", d, kvd, L.v);
    m.upload_linear(tensors, p + "self_attn.o_proj", qd, d, L.o);
    m.upload_linear(tensors, p + "mlp.gate_proj", d, f, L.gate);
    m.upload_linear(tensors, p + "mlp.up_proj", d, f, L.up);
    m.upload_linear(tensors, p + "mlp.down_proj", f, d, L.down);
    if (c.qkv_bias) {
      m.upload_vector(tensors, p + "self_attn.q_proj.bias", qd, L.q.bias);
      m.upload_vector(tensors, p + "self_attn.k_proj.bias", kvd, L.k.bias);
      m.upload_vector(tensors, p + "self_attn.v_proj.bias", kvd, L.v.bias);
    }
    if (c.qk_norm) {
      m.upload_vector(tensors, p + "self_attn.q_norm.weight", c.head_dim, L.q_norm);
      m.upload_vector(tensors, p + "self_attn.k_norm.weight", c.head_dim, L.k_norm);
    }
    if (c.norm == NormKind::SubLN) {
      m.upload_vector(tensors, p + "self_attn.attn_sub_norm.weight", qd, L.attn_sub_norm);
      m.upload_vector(tensors, p + "mlp.ffn_sub_norm.weight", f, L.ffn_sub_norm);
    }
    m.layers.push_back(std::move(L));
  }
  // RoPE tables, computed as the CPU engine computes them (fp32, same expressions).
  const int64_t half = c.head_dim / 2;
  std::vector<float> cs(static_cast<size_t>(c.max_seq_len * half)), sn(cs.size());
  for (int64_t i = 0; i < half; ++i) {
    const float expo = static_cast<float>(2 * i) / static_cast<float>(c.head_dim);
    const float inv_freq = 1.0f / std::pow(c.rope_theta, expo);
    for (int64_t pos = 0; pos < c.max_seq_len; ++pos) {
      const float a = static_cast<float>(pos) * inv_freq;
      cs[pos * half + i] = std::cos(a);
      sn[pos * half + i] = std::sin(a);
    }
  }
  m.rope_cos.upload(cs.data(), cs.size() * sizeof(float));
  m.rope_sin.upload(sn.data(), sn.size() * sizeof(float));
}

DeviceModel::~DeviceModel() = default;

const ModelConfig& DeviceModel::config() const { return impl_->cfg; }
int DeviceModel::device() const { return impl_->device; }
std::string DeviceModel::device_name() const { return impl_->name; }
int64_t DeviceModel::weight_bytes_per_token() const { return impl_->weight_bytes; }
int64_t DeviceModel::device_bytes() const { return impl_->device_bytes; }

int64_t DeviceModel::logits_rows(const Batch& batch, bool all_logits) const {
  if (batch.offsets.empty()) return 0;
  return all_logits ? batch.offsets.back() : static_cast<int64_t>(batch.seq_ids.size());
}

void DeviceModel::check_batch(const DeviceKVCache& cache, const Batch& b) const {
  const ModelConfig& c = impl_->cfg;
  const DeviceKVCache::Impl& kv = *cache.impl_;
  if (kv.n_layers != c.num_layers || kv.n_kv != c.num_kv_heads || kv.head_dim != c.head_dim)
    fail("KV cache was made for another model config");
  if (kv.device != impl_->device) fail("KV cache lives on another CUDA device");
  check_batch_against(b, kv.n_seqs, kv.max_len, kv.lengths, c.vocab_size);
}

void DeviceModel::forward(DeviceKVCache& cache, const Batch& b, bool all_logits, float* logits) const {
  DeviceKVCache::Impl& kv = *cache.impl_;
  std::unique_lock<std::mutex> lock(kv.busy, std::try_to_lock);
  if (!lock.owns_lock()) throw std::runtime_error("KV cache is in use by another forward call");
  check_batch(cache, b);
  Impl& m = *impl_;
  std::lock_guard<std::mutex> model_lock(m.mu);
  DeviceScope scope(m.device);
  const int64_t N = b.offsets.back(), R = logits_rows(b, all_logits);
  std::vector<int32_t> seq(static_cast<size_t>(N)), pos(static_cast<size_t>(N)), rows(static_cast<size_t>(R));
  for (size_t i = 0; i + 1 < b.offsets.size(); ++i) {
    for (int64_t t = b.offsets[i]; t < b.offsets[i + 1]; ++t) {
      seq[t] = static_cast<int32_t>(b.seq_ids[i]);
      pos[t] = static_cast<int32_t>(kv.lengths[static_cast<size_t>(b.seq_ids[i])] + (t - b.offsets[i]));
    }
    if (!all_logits) rows[i] = static_cast<int32_t>(b.offsets[i + 1] - 1);
  }
  m.ensure_workspace(N, R, 0);
  const size_t i32 = sizeof(int32_t);
  BITNET_CUDA_CHECK(cudaMemcpyAsync(m.tokens.as<void>(), b.tokens, N * i32, cudaMemcpyHostToDevice, m.stream));
  BITNET_CUDA_CHECK(cudaMemcpyAsync(m.tok_seq.as<void>(), seq.data(), N * i32, cudaMemcpyHostToDevice, m.stream));
  BITNET_CUDA_CHECK(cudaMemcpyAsync(m.tok_pos.as<void>(), pos.data(), N * i32, cudaMemcpyHostToDevice, m.stream));
  if (!all_logits) BITNET_CUDA_CHECK(cudaMemcpyAsync(m.rows.as<void>(), rows.data(), R * i32, cudaMemcpyHostToDevice, m.stream));
  m.enqueue_forward(kv, N, R, all_logits ? nullptr : m.rows.as<int32_t>());
  BITNET_CUDA_CHECK(cudaMemcpyAsync(logits, m.logits.as<void>(), static_cast<size_t>(R * m.cfg.vocab_size) * sizeof(float),
                                    cudaMemcpyDeviceToHost, m.stream));
  BITNET_CUDA_CHECK(cudaStreamSynchronize(m.stream));  // also keeps seq/pos/rows alive until copied
  for (size_t i = 0; i < b.seq_ids.size(); ++i) kv.lengths[static_cast<size_t>(b.seq_ids[i])] += b.offsets[i + 1] - b.offsets[i];
}

void DeviceModel::greedy_decode(DeviceKVCache& cache, const std::vector<int64_t>& seq_ids, const int32_t* first_tokens,
                                int64_t n_steps, bool use_graph, int32_t* out) const {
  if (n_steps < 1) fail("greedy_decode: n_steps must be >= 1");
  Batch b;  // one token per sequence: reuse the batch checks for slots, context and token ids
  b.seq_ids = seq_ids;
  for (size_t i = 0; i <= seq_ids.size(); ++i) b.offsets.push_back(static_cast<int64_t>(i));
  b.tokens = first_tokens;
  DeviceKVCache::Impl& kv = *cache.impl_;
  std::unique_lock<std::mutex> lock(kv.busy, std::try_to_lock);
  if (!lock.owns_lock()) throw std::runtime_error("KV cache is in use by another forward call");
  check_batch(cache, b);
  for (int64_t s : seq_ids)
    if (kv.lengths[static_cast<size_t>(s)] + n_steps > kv.max_len)
      fail("greedy_decode: sequence slot " + std::to_string(s) + " holds " + std::to_string(kv.lengths[static_cast<size_t>(s)]) +
           " tokens; " + std::to_string(n_steps) + " steps exceed the context of " + std::to_string(kv.max_len));
  Impl& m = *impl_;
  std::lock_guard<std::mutex> model_lock(m.mu);
  DeviceScope scope(m.device);
  const int64_t B = static_cast<int64_t>(seq_ids.size());
  std::vector<int32_t> seq(static_cast<size_t>(B)), pos(static_cast<size_t>(B));
  for (int64_t i = 0; i < B; ++i) {
    seq[i] = static_cast<int32_t>(seq_ids[i]);
    pos[i] = static_cast<int32_t>(kv.lengths[static_cast<size_t>(seq_ids[i])]);
  }
  m.ensure_workspace(B, B, n_steps);
  const size_t i32 = sizeof(int32_t);
  BITNET_CUDA_CHECK(cudaMemcpyAsync(m.tokens.as<void>(), first_tokens, B * i32, cudaMemcpyHostToDevice, m.stream));
  BITNET_CUDA_CHECK(cudaMemcpyAsync(m.tok_seq.as<void>(), seq.data(), B * i32, cudaMemcpyHostToDevice, m.stream));
  BITNET_CUDA_CHECK(cudaMemcpyAsync(m.tok_pos.as<void>(), pos.data(), B * i32, cudaMemcpyHostToDevice, m.stream));
  BITNET_CUDA_CHECK(cudaMemsetAsync(m.step.as<void>(), 0, i32, m.stream));
  // One decode step: forward, argmax into the token buffer (the next step's input), bookkeeping.
  auto step = [&] {
    m.enqueue_forward(kv, B, B, nullptr);
    launch_argmax(m.logits.as<float>(), B, m.cfg.vocab_size, m.tokens.as<int32_t>(), m.stream);
    launch_greedy_advance(m.tokens.as<int32_t>(), B, m.tok_pos.as<int32_t>(), m.step.as<int32_t>(), m.out.as<int32_t>(), m.stream);
  };
  if (use_graph) {
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    BITNET_CUDA_CHECK(cudaStreamBeginCapture(m.stream, cudaStreamCaptureModeThreadLocal));
    try {
      step();
    } catch (...) {
      cudaStreamEndCapture(m.stream, &graph);
      if (graph) cudaGraphDestroy(graph);
      throw;
    }
    BITNET_CUDA_CHECK(cudaStreamEndCapture(m.stream, &graph));
    const cudaError_t inst = cudaGraphInstantiate(&exec, graph, 0);
    cudaGraphDestroy(graph);
    check(inst, "cudaGraphInstantiate");
    cudaError_t e = cudaSuccess;
    for (int64_t s = 0; s < n_steps && e == cudaSuccess; ++s) e = cudaGraphLaunch(exec, m.stream);
    cudaGraphExecDestroy(exec);
    check(e, "cudaGraphLaunch");
  } else {
    for (int64_t s = 0; s < n_steps; ++s) step();
  }
  BITNET_CUDA_CHECK(cudaMemcpyAsync(out, m.out.as<void>(), static_cast<size_t>(n_steps * B) * i32, cudaMemcpyDeviceToHost, m.stream));
  BITNET_CUDA_CHECK(cudaStreamSynchronize(m.stream));
  for (int64_t s : seq_ids) kv.lengths[static_cast<size_t>(s)] += n_steps;
}

// ---- bench helper -------------------------------------------------------------------------------

double bench_ternary_gemv(int device, int64_t out, int64_t in, int64_t m, int iters) {
  require_device(device);
  if (out < 1 || in < 1 || m < 1 || m > 8 || iters < 1) fail("bench_ternary_gemv: out, in, iters >= 1 and 1 <= m <= 8");
  DeviceScope scope(device);
  int smem_optin = 0;
  BITNET_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  configure_kernels(smem_optin);
  const int64_t n_blocks = (in + 127) / 128, row_bytes = n_blocks * 32, stride = n_blocks * 128;
  std::mt19937 rng(0);
  std::vector<uint8_t> w(static_cast<size_t>(out * row_bytes));
  for (auto& byte : w) {  // four valid codes (0, 1, 2) per byte
    uint8_t v = 0;
    for (int k = 0; k < 4; ++k) v |= static_cast<uint8_t>(rng() % 3) << (2 * k);
    byte = v;
  }
  std::vector<int8_t> xq(static_cast<size_t>(m * stride), 0);
  std::vector<int32_t> sums(static_cast<size_t>(m), 0);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t k = 0; k < in; ++k) {
      xq[i * stride + k] = static_cast<int8_t>(static_cast<int>(rng() % 255) - 127);
      sums[i] += xq[i * stride + k];
    }
  std::vector<float> scales(static_cast<size_t>(m), 1.0f);
  // Cycle through copies of the matrix totalling >= 512 MiB, so that L2 (50 MB on an H100) cannot
  // serve repeated calls: the figure is device-memory bandwidth.
  const size_t mat_bytes = w.size();
  const int copies = static_cast<int>(std::min<size_t>(1024, std::max<size_t>(1, (size_t{512} << 20) / mat_bytes)));
  DeviceBuffer dw, dx, ds, dsum, dy;
  dw.reserve(mat_bytes * copies);
  for (int i = 0; i < copies; ++i)
    BITNET_CUDA_CHECK(cudaMemcpy(dw.as<uint8_t>() + i * mat_bytes, w.data(), mat_bytes, cudaMemcpyHostToDevice));
  dx.upload(xq.data(), xq.size());
  ds.upload(scales.data(), scales.size() * sizeof(float));
  dsum.upload(sums.data(), sums.size() * sizeof(int32_t));
  dy.reserve(static_cast<size_t>(m * out) * sizeof(float));
  TernaryJob job;
  job.w = dw.as<uint8_t>();
  job.out = out;
  job.s_w = 1.0f;
  job.x = {dx.as<int8_t>(), stride, ds.as<float>(), dsum.as<int32_t>()};
  job.y = dy.as<float>();
  job.y_stride = out;
  auto call = [&](int i) {
    job.w = dw.as<uint8_t>() + static_cast<size_t>(i % copies) * mat_bytes;
    launch_ternary_gemv(&job, 1, n_blocks, m, nullptr);
  };
  for (int i = 0; i < std::min(copies, 64); ++i) call(i);  // warm-up
  cudaEvent_t t0, t1;
  BITNET_CUDA_CHECK(cudaEventCreate(&t0));
  BITNET_CUDA_CHECK(cudaEventCreate(&t1));
  BITNET_CUDA_CHECK(cudaEventRecord(t0, nullptr));
  for (int i = 0; i < iters; ++i) call(i);
  BITNET_CUDA_CHECK(cudaEventRecord(t1, nullptr));
  BITNET_CUDA_CHECK(cudaEventSynchronize(t1));
  float ms = 0.0f;
  BITNET_CUDA_CHECK(cudaEventElapsedTime(&ms, t0, t1));
  cudaEventDestroy(t0);
  cudaEventDestroy(t1);
  return static_cast<double>(ms) / 1e3 / iters;
}

}  // namespace cuda
}  // namespace bitnet
