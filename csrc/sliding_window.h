// Overlap-weighted sliding-window stitching on CPU (OpenMP through at::parallel_for).
//
// Shapes (every tensor contiguous, on the CPU):
//   volume / output  (N, C, D, H, W)
//   weight           (N, 1, D, H, W)  float32: sum of importance weights per voxel and image
//   windows          (B, C, rd, rh, rw)
//   starts           (B, 4) int64: (n, z, y, x) of each window's first voxel in the volume
//   importance       (rd, rh, rw) float32: per-voxel weight of a window (constant or Gaussian)
// Every start is checked against the volume before anything is read or written: a window that would
// reach outside a buffer raises ValueError (c10::ValueError) and leaves all buffers untouched.
#pragma once

#include <torch/extension.h>

#include <optional>
#include <vector>

namespace prostate_kernels {

// Copies B windows of size roi = (rd, rh, rw) out of `volume`: returns (B, C, rd, rh, rw), same dtype,
// written into `out` when given (a buffer reused across batches saves page faults on fresh memory).
at::Tensor window_gather(const at::Tensor& volume, const at::Tensor& starts, std::vector<int64_t> roi,
                         const std::optional<at::Tensor>& out);

// output[n, :, z:z+rd, y:y+rh, x:x+rw] += windows[b] * importance   (float32 accumulation)
// weight[n, 0, z:z+rd, y:y+rh, x:x+rw] += importance                  (when weight is given)
// for every window b with starts[b] = (n, z, y, x). windows may be float32/float64/float16/bfloat16.
// The summation order is the order of the windows: results do not depend on the thread count.
void window_accumulate_(at::Tensor output, const std::optional<at::Tensor>& weight, const at::Tensor& windows,
                        const at::Tensor& starts, const at::Tensor& importance);

// output[n, c] /= weight[n or 0, 0] voxel by voxel; voxels of weight <= 0 (covered by no window) become 0.
void window_normalize_(at::Tensor output, const at::Tensor& weight);

// output[n, c] /= the weight map of windows placed at `positions` (P, 3) int64 rows (z, y, x), the same
// for every image: sum over positions of `importance` (rd, rh, rw). Same result as window_accumulate_
// into a zeroed (1, 1, D, H, W) weight followed by window_normalize_, without allocating that buffer:
// the weight is summed one plane at a time in cache. Voxels no window covers become 0.
void window_normalize_by_positions_(at::Tensor output, const at::Tensor& positions, const at::Tensor& importance);

}  // namespace prostate_kernels
