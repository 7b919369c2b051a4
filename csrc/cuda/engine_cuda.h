// CUDA engine: the CPU engine's forward (engine.h) on one NVIDIA GPU. Plain C++ interface (no CUDA
// or pybind11 headers), so bindings.cpp, compiled by the host compiler, can include it.
//
// Loading validates the tensors with the CPU loader (same checks, same error messages) and then
// uploads them: i2_b128 ternary codes as they are (the GEMV and GEMM kernels read that layout
// directly, see README.md), dense matrices in their file dtype, norm vectors as fp32. The KV cache
// lives in device memory, fp32, laid out like the CPU cache.
//
// Errors: std::invalid_argument for bad input (Python ValueError), std::runtime_error for CUDA
// failures and a missing device (message starts "no CUDA device found").
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "engine.h"

namespace bitnet {
namespace cuda {

// Usable CUDA devices: 0 when the driver or a device is missing. Never throws.
int device_count();
// "NAME (sm_XY, N SMs, M GiB)" of a device; throws when it does not exist.
std::string device_name(int device);
// Throws std::runtime_error naming why device `device` cannot be used.
void require_device(int device);

class DeviceModel;

// Per-sequence KV cache in device memory: (layer, seq, kv_head, pos, head_dim) fp32, keys after RoPE.
class DeviceKVCache {
 public:
  DeviceKVCache(const ModelConfig& cfg, int device, int64_t n_seqs, int64_t max_len);
  ~DeviceKVCache();
  DeviceKVCache(const DeviceKVCache&) = delete;
  DeviceKVCache& operator=(const DeviceKVCache&) = delete;

  int64_t n_seqs() const;
  int64_t max_len() const;
  int64_t length(int64_t seq) const;
  void reset(int64_t seq);  // seq < 0: all
  void truncate(int64_t seq, int64_t length);  // keep the first `length` tokens (as KVCache::truncate)
  int64_t bytes() const;

  struct Impl;

 private:
  friend class DeviceModel;
  std::unique_ptr<Impl> impl_;
};

class DeviceModel {
 public:
  // tensors: the same borrowed host buffers the CPU Model takes; copied to the device here.
  DeviceModel(const ModelConfig& cfg, const TensorMap& tensors, int device);
  ~DeviceModel();
  DeviceModel(const DeviceModel&) = delete;
  DeviceModel& operator=(const DeviceModel&) = delete;

  const ModelConfig& config() const;
  int device() const;
  std::string device_name() const;
  int64_t weight_bytes_per_token() const;  // as Model::weight_bytes_per_token
  int64_t device_bytes() const;            // weights resident on the device

  int64_t logits_rows(const Batch& batch, bool all_logits) const;
  void check_batch(const DeviceKVCache& cache, const Batch& batch) const;  // throws std::invalid_argument
  // As Model::forward: appends the batch to the cache, writes (logits_rows, vocab) fp32 to host memory.
  void forward(DeviceKVCache& cache, const Batch& batch, bool all_logits, float* logits) const;

  // Greedy decoding on the device: feeds first_tokens[i] to sequence seq_ids[i], then n_steps - 1
  // argmax tokens, without a host round trip per step (the step is captured once as a CUDA graph
  // when use_graph). Writes the n_steps argmax tokens per sequence to out (n_steps, n_seqs).
  void greedy_decode(DeviceKVCache& cache, const std::vector<int64_t>& seq_ids, const int32_t* first_tokens,
                     int64_t n_steps, bool use_graph, int32_t* out) const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

// Mean seconds per call of the decode GEMV (m activation rows) on a random (out, in) i2_b128
// matrix, over `iters` calls after a warm-up, cycling through copies of it that together exceed
// L2; for bench/gpu_decode.py's bandwidth figure.
double bench_ternary_gemv(int device, int64_t out, int64_t in, int64_t m, int iters);

}  // namespace cuda
}  // namespace bitnet
