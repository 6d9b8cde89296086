// Fresh CPU outputs of the data-movement ops (shuffle_patches, mix_subpatches, patch_tokens): asked for 2 MiB pages
// before their first touch.
//
// A fresh output of many MB is allocated and then written once, right away. Large allocations come straight from
// mmap (glibc above its mmap threshold), so every 4 KiB page faults on first touch; in a VM that costs more than the
// op's own memory traffic (measured, Intel Xeon 2 cores, B = 64 float32 tokens: 15 ms fresh vs 3 ms into `out=`).
// Where transparent huge pages are in `madvise` mode (the default of many distributions and cloud images),
// madvise(MADV_HUGEPAGE) on the untouched range makes the first touch fault 2 MiB at a time, 512 times fewer faults.
// PyTorch's THP_MEM_ALLOC_ENABLE=1 does the same for every allocation; this does it for the op's own output only.
// The kernel still zeroes each page it hands out: a fresh output costs that write on top of the op's (the limit
// `clone` has too); `out=` into a reused buffer pays neither.
//
// The hint has a tail on VMs that hand free memory back to their host (virtio-balloon free-page reporting, as in
// Firecracker): the host discards free 2 MiB blocks, and the first touch of one again costs host faults. Measured on
// such a VM (Intel Xeon, 2 cores): a fresh float32 B = 64 shuffle in 4.5-5.5 ms (1.7-2.1x clone) in most runs, but
// 47 ms (0.2x clone) in runs straight after a large build freed much memory (benchmarks/RESULTS.md, "Issue 22
// closed: ..."). PPML_HUGE_PAGES=0 turns the hint off; `out=` avoids the question.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace ppml::ops {

// Outputs below this size are left alone: glibc's largest mmap threshold (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit).
// Below it, once a block of that size has been freed, glibc serves the next one from its heap, from pages already
// touched; hinting those made a 9.6 MB uint8 shuffle 2x slower (Intel Xeon, measured).
constexpr int64_t kHugePageHintBytes = int64_t{32} << 20;

// False when the environment says PPML_HUGE_PAGES=0 (read once, at the first fresh output).
inline bool huge_page_hint_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("PPML_HUGE_PAGES");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return enabled;
}

// Asks for 2 MiB pages on the 2 MiB-aligned part of `out`'s bytes; `out` must not have been written yet (touched
// pages keep their 4 KiB pages, which is harmless). A hint: failures (THP off, no Linux) change nothing.
inline at::Tensor& with_huge_pages(at::Tensor& out) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const int64_t n = static_cast<int64_t>(out.nbytes());
  if (out.is_cpu() && n >= kHugePageHintBytes && huge_page_hint_enabled()) {
    constexpr uintptr_t kHuge = uintptr_t{2} << 20;
    const auto start = reinterpret_cast<uintptr_t>(out.data_ptr());
    const uintptr_t lo = (start + kHuge - 1) & ~(kHuge - 1), hi = (start + static_cast<uintptr_t>(n)) & ~(kHuge - 1);
    if (hi > lo) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
  }
#endif
  return out;
}

}  // namespace ppml::ops
