// Argument checks shared by the CPU and CUDA kernels. Every message names the argument, so a
// user who passes a wrong tensor learns which one from the error alone.
#pragma once

#include <ATen/ATen.h>

namespace fastflow {

inline void check_same(const at::Tensor& ref, const char* ref_name, const at::Tensor& t,
                       const char* name) {
  TORCH_CHECK(t.sizes() == ref.sizes(), "fastflow: ", name, " must have the shape of ", ref_name,
              " ", ref.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "fastflow: ", name, " must have the dtype of ",
              ref_name, " (", ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), "fastflow: ", name, " must be on the device of ",
              ref_name, " (", ref.device(), "), got ", t.device());
}

inline void check_batched(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() >= 2, "fastflow: ", name,
              " must have a batch dimension and at least one feature dimension, got shape ",
              t.sizes());
  TORCH_CHECK(t.size(0) >= 1, "fastflow: ", name, " has an empty batch (shape ", t.sizes(), ")");
}

// Where the output keeps the input's layout. Contiguous and channels-last both store each sample
// as one dense block, which is all a per-sample kernel needs; any other stride pattern is
// copied to contiguous first.
inline at::MemoryFormat per_sample_format(const at::Tensor& t) {
  if (t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return at::MemoryFormat::ChannelsLast;
  }
  return at::MemoryFormat::Contiguous;
}

// `t` itself when each sample is a dense block in `fmt`, samples any distance apart (a row slice
// such as out[:, :D] of a wider tensor); else a copy in `fmt`. Kernels then address sample b at
// data + b * sample_stride(t).
inline at::Tensor dense_samples(const at::Tensor& t, at::MemoryFormat fmt) {
  if (t.is_contiguous(fmt)) {
    return t;
  }
  if (fmt == at::MemoryFormat::Contiguous) {
    int64_t inner = 1;
    bool dense = true;
    for (int64_t d = t.dim() - 1; d >= 1 && dense; --d) {
      dense = t.size(d) == 1 || t.stride(d) == inner;
      inner *= t.size(d);
    }
    if (dense && t.stride(0) >= inner) {
      return t;
    }
  }
  return t.contiguous(fmt);
}

// Distance between consecutive samples of a tensor returned by dense_samples.
inline int64_t sample_stride(const at::Tensor& t) {
  return t.size(0) > 1 ? t.stride(0) : t.numel();
}

}  // namespace fastflow
