// Device-side checks of data the host must not wait for (keys, labels): torch's CUDA_KERNEL_ASSERT_MSG where the
// torch headers have it, the message-less CUDA_KERNEL_ASSERT otherwise. Either stays active in release builds (torch
// defines them independently of NDEBUG); kernels also clamp what they index with, so memory safety never depends on it.
#pragma once

#include <c10/macros/Macros.h>

#ifndef CUDA_KERNEL_ASSERT_MSG
#define CUDA_KERNEL_ASSERT_MSG(cond, msg) CUDA_KERNEL_ASSERT(cond)
#endif
