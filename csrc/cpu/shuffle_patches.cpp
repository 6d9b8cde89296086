// CPU kernel of ppml::shuffle_patches: a parallel gather of contiguous patch rows, one memcpy-sized move each.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include "common/shuffle_patches.h"
#include "cpu/fresh_output.h"

namespace ppml::ops {
namespace {

// Every row of perm must be a permutation of 0..N-1: anything else would read outside the image (or duplicate
// tiles, which the backward pass cannot undo). Returns the first of rows [b0, b1) that is not, or -1.
int64_t first_bad_perm_row(const int64_t* perm, int64_t N, int64_t b0, int64_t b1, std::vector<uint8_t>& seen) {
  seen.resize(static_cast<size_t>(N));
  for (int64_t b = b0; b < b1; ++b) {
    std::fill(seen.begin(), seen.end(), 0);
    const int64_t* row = perm + b * N;
    for (int64_t i = 0; i < N; ++i) {
      const int64_t v = row[i];
      if (v < 0 || v >= N || seen[v]) return b;
      seen[v] = 1;
    }
  }
  return -1;
}

// Copies one patch row of Bytes bytes; a compile-time size lets memcpy become a few vector moves.
template <int64_t Bytes>
inline void copy_run(char* dst, const char* src) {
  std::memcpy(dst, src, Bytes);
}

// One task unit is a tile row of one plane (p image rows): output rows are written in order from N scattered source
// tiles, so two software prefetches (the next row of each tile, and the source stream 64 KiB ahead) feed reads no
// hardware prefetcher predicts; the measurements behind them: benchmarks/RESULTS.md, "CPU shuffle: prefetch
// experiments (moved from shuffle_patches.cpp)".
//
// Each task first checks the key rows its units use (and gathers nothing if one is bad): the check and the gather
// share one parallel region. A separate one cost a second fork/join per call, which on the shared 2-core VM, with the
// other processes holding the cores, doubled the time of a 0.4 ms uint8 B=64 call (each region waits for a descheduled
// thread). Returns a bad row, or -1.
template <int64_t Bytes>
int64_t gather_tile_rows(const ShuffleGeometry& g, const int64_t* perm, const char* src, char* dst,
                         int64_t run_bytes) {
  constexpr int64_t kAheadBytes = int64_t{64} << 10;
  constexpr int64_t kLine = 64;
  // Runs shorter than this skip the next-row prefetch: a 16-byte run's line holds other tiles' rows already fetched.
  constexpr int64_t kMinPrefetchedRun = 32;
  const int64_t tiles_y = g.height / g.patch;
  const int64_t units = g.planes * tiles_y;
  const int64_t unit_bytes = g.patch * g.row_units;  // row_units: bytes per image row
  const int64_t ahead_units = (kAheadBytes + unit_bytes - 1) / unit_bytes;
  const int64_t prefetch_per_row = (unit_bytes + g.patch - 1) / g.patch;  // linear-stream bytes per output row
  // ~64 KiB of output per task: large enough to amortise scheduling, small enough to balance the cores.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, unit_bytes));
  std::atomic<int64_t> bad_row{-1};
  at::parallel_for(0, units, grain, [&](int64_t begin, int64_t end) {
    {
      std::vector<uint8_t> seen;
      const int64_t per_key = tiles_y * g.planes_per_perm;
      const int64_t bad = first_bad_perm_row(perm, g.num_tiles, begin / per_key, (end - 1) / per_key + 1, seen);
      if (bad >= 0) {
        int64_t expected = -1;
        bad_row.compare_exchange_strong(expected, bad);
        return;
      }
    }
    // Copies local to this call: captured variables live in the closure, which a char* store may alias, so the
    // copy loop would reload them after every store; these stay in registers.
    const int64_t p = g.patch, tiles_x = g.tiles_x, row = g.row_units, run = run_bytes;
    const bool next_row_prefetch = (Bytes > 0 ? Bytes : run) >= kMinPrefetchedRun;
    std::vector<const char*> from_storage(static_cast<size_t>(tiles_x));
    const char** const from = from_storage.data();
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t plane = unit / tiles_y;
      const int64_t ty = unit - plane * tiles_y;
      const int64_t* tiles = perm + (plane / g.planes_per_perm) * g.num_tiles + ty * tiles_x;
      for (int64_t tx = 0; tx < tiles_x; ++tx) {
        const int64_t sy = tiles[tx] / tiles_x;
        from[tx] = src + shuffle_source_offset<int64_t>(g, plane, int64_t{0}, sy, tiles[tx] - sy * tiles_x);
      }
      char* out = dst + shuffle_row_offset<int64_t>(g, plane, ty * p);
      // Units past the end of the tensor have nothing to prefetch (never an address outside it).
      const char* stream = unit + ahead_units < units ? src + (unit + ahead_units) * unit_bytes : nullptr;
      for (int64_t r = 0; r < p; ++r) {
        if (stream != nullptr) {
          const int64_t stop = std::min(unit_bytes, (r + 1) * prefetch_per_row);
          for (int64_t off = r * prefetch_per_row; off < stop; off += kLine) __builtin_prefetch(stream + off, 0, 2);
        }
        char* o = out + r * row;
        const int64_t shift = r * row;
        const bool ahead = next_row_prefetch && r + 1 < p;
        for (int64_t tx = 0; tx < tiles_x; ++tx) {
          if (ahead) __builtin_prefetch(from[tx] + shift + row);
          if constexpr (Bytes > 0) {
            copy_run<Bytes>(o + tx * Bytes, from[tx] + shift);
          } else {
            std::memcpy(o + tx * run, from[tx] + shift, run);
          }
        }
      }
    }
  });
  return bad_row.load();
}

// Works in `out`'s layout (contiguous or channels_last): the images are brought to it first if needed.
void shuffle_patches_out_cpu(const at::Tensor& images, const at::Tensor& perm, int64_t patch_size,
                    at::Tensor& out) {
  check_shuffle_args(images, perm, patch_size);
  const bool cl = check_out("ppml.shuffle_patches", out, images.sizes(), images.scalar_type(), images);
  if (out.numel() == 0) return;
  const at::Tensor src = images.contiguous(cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  const at::Tensor perm_c = perm.contiguous();

  // Units are bytes here: the CPU path copies whole runs with memcpy, so no alignment is needed.
  const ShuffleGeometry g = make_shuffle_geometry(src, cl, patch_size, 1);
  const int64_t run_bytes = g.run_units;
  const char* s = static_cast<const char*>(src.const_data_ptr());
  char* d = static_cast<char*>(out.mutable_data_ptr());
  const int64_t* pp = perm_c.const_data_ptr<int64_t>();
  int64_t bad = -1;
  switch (run_bytes) {
    case 16: bad = gather_tile_rows<16>(g, pp, s, d, run_bytes); break;
    case 32: bad = gather_tile_rows<32>(g, pp, s, d, run_bytes); break;
    case 48: bad = gather_tile_rows<48>(g, pp, s, d, run_bytes); break;
    case 64: bad = gather_tile_rows<64>(g, pp, s, d, run_bytes); break;
    case 128: bad = gather_tile_rows<128>(g, pp, s, d, run_bytes); break;
    default: bad = gather_tile_rows<0>(g, pp, s, d, run_bytes); break;
  }
  TORCH_CHECK_VALUE(bad < 0, "ppml.shuffle_patches: every row of perm must be a permutation of 0..", g.num_tiles - 1,
                    " (N=(H/p)*(W/p)=", g.num_tiles, "), row ", bad, " is not");
}

at::Tensor shuffle_patches_cpu(const at::Tensor& images, const at::Tensor& perm, int64_t patch_size) {
  check_shuffle_args(images, perm, patch_size);
  at::Tensor out = empty_shuffle_output(images);
  shuffle_patches_out_cpu(images, perm, patch_size, with_huge_pages(out));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ppml, CPU, m) {
  m.impl("shuffle_patches", &shuffle_patches_cpu);
  m.impl("shuffle_patches.out", &shuffle_patches_out_cpu);
}

}  // namespace ppml::ops
