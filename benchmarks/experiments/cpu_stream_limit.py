"""What the CPU shuffle and MI kernels can reach on this machine: each op against streaming kernels written for this
test that move the same bytes in the same order with no index maths, all timed round-robin in one run.

Run from the repository root (needs a C++ compiler: the kernels below are built on the fly with
``torch.utils.cpp_extension.load_inline``, about a minute the first time, cached after)::

    python benchmarks/experiments/cpu_stream_limit.py                  # B = 64, 3 rounds, about 1 minute
    python benchmarks/experiments/cpu_stream_limit.py --batch 256 --rounds 5
    python benchmarks/experiments/cpu_stream_limit.py --ops tokens             # the tokens rows only

Rows per dtype (uint8, float32; [B, 3, 224, 224], p = 16, NCHW), each as a share of ``copy`` (``out.copy_(x)`` into a
preallocated ``out``, the bound the benchmark's targets use), the median over the rounds of the ratio within a round:

- ``clone``: ``x.clone()`` (a fresh output: the bound of ``native``).
- ``stream``: ``memcpy`` of one contiguous half per thread (``at::parallel_for``, the op's threading): a copy with
  ATen's dispatch and dtype checks left out.
- ``stream_nt``: the same with non-temporal 16-byte stores (``_mm_stream_si128`` + ``_mm_sfence``; x86-64 only): no
  read-for-ownership of the destination lines, the written lines leave the cache.
- ``runs_identity``: the shuffle's loop (per tile row: N source pointers, then for each of the p rows N moves of
  one patch row, 16 bytes for uint8, 64 for float32, as fixed-size ``memcpy``) with the identity permutation: the cost
  of moving the image in patch-row pieces, reads sequential.
- ``runs_random``: the same loop with a random permutation: the shuffle's exact reads and writes, with no prefetch,
  no key check, no dispatch.
- ``runs_random_nt``: ``runs_random`` with non-temporal stores.
- ``native_out``: ``torch.ops.ppml.shuffle_patches.out`` into a preallocated buffer; ``native``: a fresh output.
- uint8 only: ``mi_native``: ``torch.ops.ppml.mix_subpatches`` (g = 2, the mean), as a share of its bound: input read
  + float32 output written (here 2 × the input's bytes, so the bound equals ``copy``'s time).

Tokens rows (``--ops tokens``; uint8 [B, 3, 224, 224] -> float32 tokens [B, 196, 768], p = 16), each as a share of
the tokens' bound (1 byte read + 4 written an element at the float32 ``copy``'s bandwidth, as in bench_tokens):
``patch_tokens_out`` (the op into a preallocated buffer), ``convert_out`` (PyTorch's uint8 -> float32 copy),
``stream_convert_nt`` / ``stream_convert`` (written for this test: the same bytes in order through a 256-entry table,
AVX2 gathers, non-temporal / plain 32-byte stores, one contiguous range per thread), ``stream_fill_nt`` /
``stream_fill`` (the same stores with nothing read: the write path alone).

Also printed: ``copy_`` bandwidth for growing sizes (where the last-level cache ends on this machine).

Nothing here is used by ppml; the results are in benchmarks/RESULTS.md ("CPU bandwidth targets on Intel Xeon").
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from torch.utils.cpp_extension import load_inline

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from _timing import CpuContention, copy_call, environment, time_cpu_interleaved  # noqa: E402

import ppml  # noqa: E402

CPP = r"""
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cstring>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

// One contiguous half per thread (the grain makes at::parallel_for hand each thread one range), as the ops do.
void stream_copy(const torch::Tensor& src, torch::Tensor& dst, bool nt) {
  const char* s = static_cast<const char*>(src.const_data_ptr());
  char* d = static_cast<char*>(dst.mutable_data_ptr());
  const int64_t n = src.nbytes();
  at::parallel_for(0, n / 64, 1024, [&](int64_t begin, int64_t end) {
#if defined(__x86_64__)
    if (nt) {
      for (int64_t i = begin * 64; i < end * 64; i += 16) {
        _mm_stream_si128(reinterpret_cast<__m128i*>(d + i), _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
      }
      _mm_sfence();
      return;
    }
#endif
    std::memcpy(d + begin * 64, s + begin * 64, (end - begin) * 64);
  });
}

template <int64_t Bytes, bool NT>
inline void move(char* d, const char* s) {
#if defined(__x86_64__)
  if constexpr (NT) {
    for (int64_t k = 0; k < Bytes; k += 16) {
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + k), _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + k)));
    }
    return;
  }
#endif
  std::memcpy(d, s, Bytes);
}

// The shuffle's reads and writes for an NCHW [B, C, H, W] image, in its order: one task unit is a tile row of one
// plane; its N source pointers first, then p output rows, each W/p moves of one patch row (Bytes bytes).
template <int64_t Bytes, bool NT>
void runs(const torch::Tensor& src, torch::Tensor& dst, const torch::Tensor& perm, int64_t p) {
  const int64_t B = src.size(0), C = src.size(1), H = src.size(2), W = src.size(3);
  const int64_t row = W * src.element_size(), tiles_x = W / p, tiles_y = H / p, units = B * C * tiles_y;
  const char* s = static_cast<const char*>(src.const_data_ptr());
  char* d = static_cast<char*>(dst.mutable_data_ptr());
  const int64_t* key = perm.const_data_ptr<int64_t>();
  at::parallel_for(0, units, 16, [&](int64_t begin, int64_t end) {
    std::vector<const char*> from(tiles_x);
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t plane = unit / tiles_y, ty = unit % tiles_y;
      const int64_t* tiles = key + (plane / C) * tiles_x * tiles_y + ty * tiles_x;
      for (int64_t tx = 0; tx < tiles_x; ++tx) {
        from[tx] = s + (plane * H + tiles[tx] / tiles_x * p) * row + tiles[tx] % tiles_x * Bytes;
      }
      char* out = d + (plane * H + ty * p) * row;
      for (int64_t r = 0; r < p; ++r) {
        for (int64_t tx = 0; tx < tiles_x; ++tx) move<Bytes, NT>(out + r * row + tx * Bytes, from[tx] + r * row);
      }
    }
#if defined(__x86_64__)
    if constexpr (NT) _mm_sfence();
#endif
  });
}

void runs_any(const torch::Tensor& src, torch::Tensor& dst, const torch::Tensor& perm, int64_t p, bool nt) {
  const int64_t bytes = p * src.element_size();
  TORCH_CHECK(src.is_contiguous() && dst.is_contiguous() && (bytes == 16 || bytes == 64), "NCHW, p*elem 16 or 64");
  if (bytes == 16) return nt ? runs<16, true>(src, dst, perm, p) : runs<16, false>(src, dst, perm, p);
  return nt ? runs<64, true>(src, dst, perm, p) : runs<64, false>(src, dst, perm, p);
}

// patch_tokens' bytes with none of its index maths: uint8 [n] -> float32 [n] through a 256-entry table (one per
// call: the op has one per channel), in order, 1 byte read and 4 written per element; the stores non-temporal (as
// the op's, 32-byte aligned) or plain. With `fill` nothing is read: the table's entry 0 is written everywhere.
#if defined(__x86_64__)
__attribute__((target("avx2"))) void convert_avx2(const uint8_t* s, float* d, const float* lut, int64_t b, int64_t e,
                                                  bool nt, bool fill) {
  const __m256 zero = _mm256_set1_ps(lut[0]);
  for (int64_t i = b; i < e; i += 8) {
    __m256 v = zero;
    if (!fill) {
      const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(s + i));
      v = _mm256_i32gather_ps(lut, _mm256_cvtepu8_epi32(bytes), 4);
    }
    if (nt) {
      _mm256_stream_ps(d + i, v);
    } else {
      _mm256_storeu_ps(d + i, v);
    }
  }
  if (nt) _mm_sfence();
}
#endif

void tokens_stream(const torch::Tensor& src, torch::Tensor& dst, const torch::Tensor& lut, bool nt, bool fill) {
  TORCH_CHECK(src.is_contiguous() && dst.is_contiguous() && src.numel() == dst.numel() && src.numel() % 8 == 0 &&
              reinterpret_cast<uintptr_t>(dst.data_ptr()) % 32 == 0, "uint8 [n], float32 [n], n % 8 == 0, aligned");
  const uint8_t* s = src.const_data_ptr<uint8_t>();
  float* d = dst.mutable_data_ptr<float>();
  const float* t = lut.const_data_ptr<float>();
  at::parallel_for(0, src.numel() / 8, 4096, [&](int64_t begin, int64_t end) {
#if defined(__x86_64__)
    if (__builtin_cpu_supports("avx2")) return convert_avx2(s, d, t, begin * 8, end * 8, nt, fill);
#endif
    for (int64_t i = begin * 8; i < end * 8; ++i) d[i] = fill ? t[0] : t[s[i]];
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("stream_copy", &stream_copy);
  m.def("runs", &runs_any);
  m.def("tokens_stream", &tokens_stream);
}
"""

FLAGS = ["-O3", "-fopenmp", "-std=c++20"]


def build():
    return load_inline("ppml_cpu_stream_limit", cpp_sources=[CPP], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"])


def llc_knee(budget_s: float) -> list[tuple[float, float]]:
    """(MB copied, GB/s of ``copy_`` counting read + write) for sizes from 1 MB to 308 MB."""
    rows = []
    for mb in (1, 4, 9.6, 19.3, 38.5, 77, 154, 308):
        x = torch.empty(int(mb * 1e6), dtype=torch.uint8).fill_(1)
        r = time_cpu_interleaved({"copy": copy_call(x)}, budget_s=budget_s, warmup=3)["copy"]
        rows.append((mb, 2 * x.numel() / (r["ms"] * 1e-3) / 1e9))
    return rows


def one_round(mod, dtype: torch.dtype, B: int, budget_s: float) -> dict[str, float]:
    """Times every row of ``dtype`` round-robin; returns name -> share of copy (copy ms / ms) and ``copy_ms``."""
    p = 16
    x = torch.randint(0, 256, (B, 3, 224, 224), dtype=torch.uint8).to(dtype)
    perm = ppml.random_permutations(B, 196)
    ident = torch.arange(196).repeat(B, 1)
    bufs = {k: torch.empty_like(x) for k in ("stream", "stream_nt", "ri", "rr", "rr_nt", "out")}
    op = torch.ops.ppml.shuffle_patches
    expected = op(x, perm, p)
    mod.runs(x, bufs["rr"], perm, p, False)
    mod.runs(x, bufs["rr_nt"], perm, p, True)
    mod.runs(x, bufs["ri"], ident, p, False)
    if not (torch.equal(bufs["rr"], expected) and torch.equal(bufs["rr_nt"], expected) and torch.equal(bufs["ri"], x)):
        raise RuntimeError("cpu_stream_limit: the streaming kernels do not reproduce the shuffle")
    calls = {
        "copy": copy_call(x),
        "clone": x.clone,
        "stream": lambda: mod.stream_copy(x, bufs["stream"], False),
        "runs_identity": lambda: mod.runs(x, bufs["ri"], ident, p, False),
        "runs_random": lambda: mod.runs(x, bufs["rr"], perm, p, False),
        "native_out": lambda: op.out(x, perm, p, out=bufs["out"]),
        "native": lambda: op(x, perm, p),
    }
    if sys.platform.startswith("linux") and os.uname().machine == "x86_64":
        calls["stream_nt"] = lambda: mod.stream_copy(x, bufs["stream_nt"], True)
        calls["runs_random_nt"] = lambda: mod.runs(x, bufs["rr_nt"], perm, p, True)
    if dtype == torch.uint8:
        calls["mi_native"] = lambda: torch.ops.ppml.mix_subpatches(x, p, 2, None)
    with CpuContention() as contention:
        res = time_cpu_interleaved(calls, budget_s=budget_s, warmup=3)
    copy_ms = res["copy"]["ms"]
    shares = {k: copy_ms / r["ms"] for k, r in res.items()}
    shares["copy_ms"] = copy_ms
    shares["other_cpu"] = contention.other_share or 0.0
    return shares


def tokens_round(mod, B: int, budget_s: float) -> dict[str, float]:
    """patch_tokens uint8 -> float32 (p = 16, ImageNet statistics) and streaming kernels with its bytes, round-robin;
    returns name -> share of the tokens' bound (1 byte read + 4 written an element at the float32 copy's bandwidth,
    as bench_tokens: copy ms x 5 / 8 / ms)."""
    p, mean, std = 16, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    x = torch.randint(0, 256, (B, 3, 224, 224), dtype=torch.uint8)
    perm = ppml.random_permutations(B, 196)
    like = torch.empty(B, 196, 3 * p * p)  # float32, the tokens' size
    lut = (torch.arange(256, dtype=torch.float32) / 255 - mean[0]) / std[0]
    bufs = {k: torch.empty_like(like) for k in ("out", "convert", "nt", "plain", "fill_nt", "fill")}
    flat = x.reshape(-1)
    mod.tokens_stream(flat, bufs["nt"].view(-1), lut, True, False)
    if not torch.equal(bufs["nt"].view(-1), lut[flat.long()]):
        raise RuntimeError("cpu_stream_limit: the streaming conversion does not reproduce the table lookup")
    op = torch.ops.ppml.patch_tokens.out
    calls = {
        "copy": copy_call(like),
        "patch_tokens_out": lambda: op(x, perm, p, mean, std, torch.float32, out=bufs["out"]),
        "convert_out": lambda: bufs["convert"].view(x.shape).copy_(x),
        "stream_convert_nt": lambda: mod.tokens_stream(flat, bufs["nt"].view(-1), lut, True, False),
        "stream_convert": lambda: mod.tokens_stream(flat, bufs["plain"].view(-1), lut, False, False),
        "stream_fill_nt": lambda: mod.tokens_stream(flat, bufs["fill_nt"].view(-1), lut, True, True),
        "stream_fill": lambda: mod.tokens_stream(flat, bufs["fill"].view(-1), lut, False, True),
    }
    with CpuContention() as contention:
        res = time_cpu_interleaved(calls, budget_s=budget_s, warmup=3)
    bound_ms = res["copy"]["ms"] * 5 / 8
    shares = {k: bound_ms / r["ms"] for k, r in res.items()}
    shares["copy_ms"] = res["copy"]["ms"]
    shares["other_cpu"] = contention.other_share or 0.0
    return shares


def print_rounds(title: str, rounds: list[dict[str, float]], share_of: str) -> None:
    names = [k for k in rounds[0] if k not in ("copy_ms", "other_cpu")]
    copy_ms = statistics.median(r["copy_ms"] for r in rounds)
    others = ", ".join(f"{r['other_cpu']:.0%}" for r in rounds)
    print(f"\n{title}: copy {copy_ms:.3f} ms (median of {len(rounds)} rounds; CPU taken by others: {others})")
    print(f"| row | share of {share_of} (median) | per round |")
    print("|---|---:|---|")
    for k in names:
        vals = [r[k] for r in rounds]
        print(f"| {k} | {statistics.median(vals):.2f} | {' '.join(f'{v:.2f}' for v in vals)} |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--budget", type=float, default=0.5, help="seconds per row per round")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--ops", default="shuffle,tokens", help="which rows: shuffle (with MI), tokens")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment("cpu")
    print(f"cpu: {env['cpu']} · {env['cores']} cores, {torch.get_num_threads()} torch threads · torch {env['torch']} "
          f"· ppml {env['ppml_commit']} · {env['date']} · load {env['load_average_1min']:.1f}")  # fmt: skip
    t0 = time.perf_counter()
    mod = build()
    print(f"built in {time.perf_counter() - t0:.0f} s")
    print("copy_ GB/s (read + write) by size: " + ", ".join(f"{mb:g} MB {gbs:.0f}" for mb, gbs in llc_knee(0.3)))
    ops = args.ops.split(",")
    for dtype in (torch.uint8, torch.float32) if "shuffle" in ops else ():
        rounds = [one_round(mod, dtype, args.batch, args.budget) for _ in range(args.rounds)]
        print_rounds(f"{str(dtype).replace('torch.', '')} B={args.batch}", rounds, "copy")
    if "tokens" in ops:
        rounds = [tokens_round(mod, args.batch, args.budget) for _ in range(args.rounds)]
        print_rounds(f"patch_tokens uint8 -> float32 B={args.batch}", rounds, "the tokens' bound")


if __name__ == "__main__":
    main()
