// Argument checks and dtype names shared by every op's host code (CPU and CUDA): one wording for every error, the
// same as ppml/_checks.py::describe on the Python side.
#pragma once

#ifndef __CUDACC_RTC__
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <sstream>
#include <string>

namespace ppml::ops {

inline const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kByte: return "uint8";
    case at::kChar: return "int8";
    case at::kShort: return "int16";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kBool: return "bool";
    default: return c10::toString(t);
  }
}

// "int32 [8, 196] on cpu": the wording ppml/_checks.py::describe uses too.
inline std::string describe(const at::Tensor& t) {
  std::ostringstream os;
  os << dtype_name(t.scalar_type()) << " " << t.sizes() << " on " << t.device();
  return os.str();
}

// Checks an `out=` tensor for ops whose output has the shape `sizes` and dtype `dtype`, and returns whether the kernel
// should work in channels_last (out is channels_last) or contiguous (out is contiguous) layout. An out sharing storage
// with the images would make a gather read what it already wrote, so it is refused. Python twin:
// ppml/ops/shuffle_patches.py::_check_out.
inline bool check_out(const char* op, const at::Tensor& out, at::IntArrayRef sizes, at::ScalarType dtype,
                      const at::Tensor& images) {
  TORCH_CHECK_VALUE(out.sizes() == sizes && out.scalar_type() == dtype && out.device() == images.device(), op,
                    ": out must be ", dtype_name(dtype), " ", sizes, " on ", images.device(), ", got ", describe(out));
  const bool contiguous = out.is_contiguous();
  const bool cl = !contiguous && out.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK_VALUE(contiguous || cl, op, ": out must be contiguous or channels_last, got strides ", out.strides());
  TORCH_CHECK_VALUE(!out.numel() || !out.is_alias_of(images), op, ": out must not share memory with images");
  return cl;
}

}  // namespace ppml::ops

#endif  // __CUDACC_RTC__
