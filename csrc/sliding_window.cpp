// CPU implementation of the sliding-window stitching ops; see sliding_window.h for shapes.
//
// Parallel work is split by *output* plane (n, channel, z), never by window, so two threads never
// write the same voxel even when windows overlap, and each voxel sums its windows in batch order.
#include "sliding_window.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <string>

namespace prostate_kernels {
namespace {

struct Start {
  int64_t n, z, y, x;
};

void check_cpu_contiguous(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous (got strides ", t.strides(),
                    " for shape ", t.sizes(), ")");
}

void check_rank(const at::Tensor& t, int64_t rank, const char* op, const char* name, const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == rank, op, ": ", name, " must be ", rank, "-D ", layout, ", got shape ",
                    t.sizes());
}

void check_float32(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
}

// Reads and bounds-checks starts (B, 4) against a volume (N, *, D, H, W) and a window (rd, rh, rw).
std::vector<Start> read_starts(const at::Tensor& starts, at::IntArrayRef volume, int64_t rd, int64_t rh,
                               int64_t rw, const char* op) {
  check_cpu_contiguous(starts, op, "starts");
  TORCH_CHECK_TYPE(starts.scalar_type() == at::kLong, op, ": starts must be int64, got ", starts.scalar_type());
  TORCH_CHECK_VALUE(starts.dim() == 2 && starts.size(1) == 4, op,
                    ": starts must have shape (B, 4) holding (n, z, y, x), got ", starts.sizes());
  const int64_t N = volume[0], D = volume[2], H = volume[3], W = volume[4];
  const int64_t* s = starts.data_ptr<int64_t>();
  std::vector<Start> out(starts.size(0));
  for (int64_t b = 0; b < starts.size(0); ++b) {
    const Start st{s[4 * b], s[4 * b + 1], s[4 * b + 2], s[4 * b + 3]};
    const bool inside = st.n >= 0 && st.n < N && st.z >= 0 && st.z + rd <= D && st.y >= 0 && st.y + rh <= H &&
                        st.x >= 0 && st.x + rw <= W;
    TORCH_CHECK_VALUE(inside, op, ": window ", b, " starts at (n, z, y, x) = (", st.n, ", ", st.z, ", ", st.y,
                      ", ", st.x, "); a window of size (", rd, ", ", rh, ", ", rw,
                      ") there reaches outside the volume of shape ", volume);
    out[b] = st;
  }
  return out;
}

// Hot loops are compiled three times (AVX-512, AVX2, baseline x86-64) and the loader picks the best
// the CPU has, so a build stays portable while using wide vectors. -ffp-contract=off (setup.py) keeps
// each update a separate multiply and add, exactly as the PyTorch twin computes it.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PK_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PK_VECTOR_CLONES
#endif

// Adds every window of the batch that covers output plane (n, z) to `plane` (H, W) of one channel:
// rows of weight x window (or of weight alone, for the weight buffer: window_channel == nullptr).
// window_channel points at channel c of window 0; consecutive windows are window_stride apart.
template <typename T>
PK_VECTOR_CLONES void accumulate_plane(float* plane, int64_t W, const T* window_channel, int64_t window_stride,
                                       const float* importance, const Start* starts, int64_t B, int64_t n,
                                       int64_t z, int64_t rd, int64_t rh, int64_t rw) {
  const int64_t window_plane = rh * rw;
  for (int64_t b = 0; b < B; ++b) {
    const Start& s = starts[b];
    if (s.n != n || z < s.z || z >= s.z + rd) continue;
    const int64_t wz = z - s.z;
    const float* imp = importance + wz * window_plane;
    if (window_channel == nullptr) {
      for (int64_t wy = 0; wy < rh; ++wy) {
        float* __restrict out = plane + (s.y + wy) * W + s.x;
        const float* __restrict w = imp + wy * rw;
        for (int64_t i = 0; i < rw; ++i) out[i] += w[i];
      }
    } else {
      const T* win = window_channel + b * window_stride + wz * window_plane;
      for (int64_t wy = 0; wy < rh; ++wy) {
        float* __restrict out = plane + (s.y + wy) * W + s.x;
        const T* __restrict v = win + wy * rw;
        const float* __restrict w = imp + wy * rw;
        for (int64_t i = 0; i < rw; ++i) out[i] += static_cast<float>(v[i]) * w[i];
      }
    }
  }
}

PK_VECTOR_CLONES void normalize_plane(float* __restrict out, const float* __restrict weight, int64_t len) {
  for (int64_t i = 0; i < len; ++i) out[i] = weight[i] > 0.0f ? out[i] / weight[i] : 0.0f;
}

// One task per output plane (n, c, z) touched by the batch; channel C stands for the weight buffer.
// windows may be nullptr when only the weight buffer is accumulated (C == 0).
template <typename T>
void accumulate_planes(float* output, float* weight, const T* windows, const float* importance,
                       const std::vector<Start>& starts, int64_t N, int64_t C, int64_t D, int64_t H, int64_t W,
                       int64_t rd, int64_t rh, int64_t rw) {
  int64_t z_lo = D, z_hi = 0;
  for (const Start& s : starts) {
    z_lo = std::min(z_lo, s.z);
    z_hi = std::max(z_hi, s.z + rd);
  }
  if (z_lo >= z_hi) return;
  const int64_t z_span = z_hi - z_lo;
  const int64_t channels = C + (weight != nullptr ? 1 : 0);
  const int64_t window_volume = rd * rh * rw, B = static_cast<int64_t>(starts.size());
  at::parallel_for(0, N * channels * z_span, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t z = z_lo + task % z_span;
      const int64_t c = (task / z_span) % channels;
      const int64_t n = task / (z_span * channels);
      if (c == C) {
        accumulate_plane<T>(weight + (n * D + z) * H * W, W, nullptr, 0, importance, starts.data(), B, n, z, rd,
                            rh, rw);
      } else {
        accumulate_plane<T>(output + ((n * C + c) * D + z) * H * W, W, windows + c * window_volume,
                            C * window_volume, importance, starts.data(), B, n, z, rd, rh, rw);
      }
    }
  });
}

}  // namespace

at::Tensor window_gather(const at::Tensor& volume, const at::Tensor& starts, std::vector<int64_t> roi,
                         const std::optional<at::Tensor>& out) {
  const char* op = "window_gather";
  check_cpu_contiguous(volume, op, "volume");
  check_rank(volume, 5, op, "volume", "(N, C, D, H, W)");
  TORCH_CHECK_VALUE(roi.size() == 3, op, ": roi must have 3 sizes (rd, rh, rw), got ", roi.size());
  for (size_t i = 0; i < 3; ++i) {
    TORCH_CHECK_VALUE(roi[i] > 0, op, ": roi sizes must be positive, got ", at::IntArrayRef(roi));
  }
  const int64_t rd = roi[0], rh = roi[1], rw = roi[2];
  const std::vector<Start> st = read_starts(starts, volume.sizes(), rd, rh, rw, op);
  const int64_t B = static_cast<int64_t>(st.size()), C = volume.size(1), D = volume.size(2),
                H = volume.size(3), W = volume.size(4);
  at::Tensor windows;
  if (out.has_value()) {
    windows = *out;
    check_cpu_contiguous(windows, op, "out");
    TORCH_CHECK_TYPE(windows.scalar_type() == volume.scalar_type(), op, ": out has dtype ", windows.scalar_type(),
                     " but volume has ", volume.scalar_type());
    TORCH_CHECK_VALUE(windows.sizes() == at::IntArrayRef({B, C, rd, rh, rw}), op, ": out must have shape (", B,
                      ", ", C, ", ", rd, ", ", rh, ", ", rw, "), got ", windows.sizes());
    TORCH_CHECK_VALUE(!windows.is_same(volume), op, ": out and volume must be different buffers");
  } else {
    windows = at::empty({B, C, rd, rh, rw}, volume.options());
  }
  if (windows.numel() == 0) return windows;
  const int64_t esize = volume.element_size();
  const char* src = static_cast<const char*>(volume.data_ptr());
  char* dst = static_cast<char*>(windows.data_ptr());
  // One task per window plane (wz, b, c), wz-major: the threads split the planes [0, rd) the way
  // window_accumulate_ splits the output planes of a batch of windows at one height, so each thread
  // writes the window rows it will read back (no cache lines moving between cores in between).
  // Rows are contiguous runs of rw elements.
  at::parallel_for(0, B * C * rd, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t wz = task / (B * C), b = (task / C) % B, c = task % C;
      const Start& s = st[b];
      const int64_t plane = (b * C + c) * rd + wz;  // destination plane in (B, C, rd, rh, rw)
      for (int64_t wy = 0; wy < rh; ++wy) {
        const int64_t from = (((s.n * C + c) * D + s.z + wz) * H + s.y + wy) * W + s.x;
        const int64_t to = (plane * rh + wy) * rw;
        std::memcpy(dst + to * esize, src + from * esize, static_cast<size_t>(rw * esize));
      }
    }
  });
  return windows;
}

void window_accumulate_(at::Tensor output, const std::optional<at::Tensor>& weight, const at::Tensor& windows,
                        const at::Tensor& starts, const at::Tensor& importance) {
  const char* op = "window_accumulate_";
  check_cpu_contiguous(output, op, "output");
  check_rank(output, 5, op, "output", "(N, C, D, H, W)");
  check_float32(output, op, "output");
  check_cpu_contiguous(windows, op, "windows");
  check_rank(windows, 5, op, "windows", "(B, C, rd, rh, rw)");
  const auto wt = windows.scalar_type();
  TORCH_CHECK_TYPE(wt == at::kFloat || wt == at::kDouble || wt == at::kHalf || wt == at::kBFloat16, op,
                   ": windows must be float32, float64, float16 or bfloat16, got ", wt);
  check_cpu_contiguous(importance, op, "importance");
  check_float32(importance, op, "importance");
  const int64_t N = output.size(0), C = output.size(1), D = output.size(2), H = output.size(3),
                W = output.size(4);
  const int64_t B = windows.size(0), rd = windows.size(2), rh = windows.size(3), rw = windows.size(4);
  TORCH_CHECK_VALUE(windows.size(1) == C, op, ": windows have ", windows.size(1), " channels but output has ", C,
                    " (windows ", windows.sizes(), ", output ", output.sizes(), ")");
  TORCH_CHECK_VALUE(importance.sizes() == windows.sizes().slice(2), op, ": importance has shape ",
                    importance.sizes(), " but windows are ", windows.sizes().slice(2));
  TORCH_CHECK_VALUE(starts.dim() == 2 && starts.size(0) == B, op, ": starts has shape ", starts.sizes(),
                    " but there are ", B, " windows: expected (", B, ", 4)");
  float* weight_ptr = nullptr;
  if (weight.has_value()) {
    const at::Tensor& w = *weight;
    check_cpu_contiguous(w, op, "weight");
    check_float32(w, op, "weight");
    TORCH_CHECK_VALUE(w.dim() == 5 && w.size(0) == N && w.size(1) == 1 && w.sizes().slice(2) == output.sizes().slice(2),
                      op, ": weight must have shape (", N, ", 1, ", D, ", ", H, ", ", W, "), got ", w.sizes());
    TORCH_CHECK_VALUE(!w.is_same(output), op, ": weight and output must be different buffers");
    weight_ptr = w.data_ptr<float>();
  }
  const std::vector<Start> st = read_starts(starts, output.sizes(), rd, rh, rw, op);
  if (B == 0 || output.numel() == 0) return;
  float* out = output.data_ptr<float>();
  const float* imp = importance.data_ptr<float>();
  switch (wt) {
    case at::kFloat:
      accumulate_planes(out, weight_ptr, windows.data_ptr<float>(), imp, st, N, C, D, H, W, rd, rh, rw);
      break;
    case at::kDouble:
      accumulate_planes(out, weight_ptr, windows.data_ptr<double>(), imp, st, N, C, D, H, W, rd, rh, rw);
      break;
    case at::kHalf:
      accumulate_planes(out, weight_ptr, windows.data_ptr<c10::Half>(), imp, st, N, C, D, H, W, rd, rh, rw);
      break;
    default:
      accumulate_planes(out, weight_ptr, windows.data_ptr<c10::BFloat16>(), imp, st, N, C, D, H, W, rd, rh, rw);
  }
}

void window_normalize_(at::Tensor output, const at::Tensor& weight) {
  const char* op = "window_normalize_";
  check_cpu_contiguous(output, op, "output");
  check_rank(output, 5, op, "output", "(N, C, D, H, W)");
  check_float32(output, op, "output");
  check_cpu_contiguous(weight, op, "weight");
  check_float32(weight, op, "weight");
  const int64_t N = output.size(0), C = output.size(1), D = output.size(2), H = output.size(3),
                W = output.size(4);
  TORCH_CHECK_VALUE(weight.dim() == 5 && (weight.size(0) == N || weight.size(0) == 1) && weight.size(1) == 1 &&
                        weight.sizes().slice(2) == output.sizes().slice(2),
                    op, ": weight must have shape (", N, " or 1, 1, ", D, ", ", H, ", ", W, "), got ",
                    weight.sizes());
  if (output.numel() == 0) return;
  const bool shared = weight.size(0) == 1;
  float* out = output.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  const int64_t plane = H * W;
  at::parallel_for(0, N * C * D, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t z = task % D, n = task / (C * D);
      normalize_plane(out + task * plane, w + ((shared ? 0 : n) * D + z) * plane, plane);
    }
  });
}

void window_normalize_by_positions_(at::Tensor output, const at::Tensor& positions, const at::Tensor& importance) {
  const char* op = "window_normalize_by_positions_";
  check_cpu_contiguous(output, op, "output");
  check_rank(output, 5, op, "output", "(N, C, D, H, W)");
  check_float32(output, op, "output");
  check_cpu_contiguous(importance, op, "importance");
  check_rank(importance, 3, op, "importance", "(rd, rh, rw)");
  check_float32(importance, op, "importance");
  check_cpu_contiguous(positions, op, "positions");
  TORCH_CHECK_TYPE(positions.scalar_type() == at::kLong, op, ": positions must be int64, got ",
                   positions.scalar_type());
  TORCH_CHECK_VALUE(positions.dim() == 2 && positions.size(1) == 3, op,
                    ": positions must have shape (P, 3) holding (z, y, x), got ", positions.sizes());
  const int64_t N = output.size(0), C = output.size(1), D = output.size(2), H = output.size(3),
                W = output.size(4);
  const int64_t rd = importance.size(0), rh = importance.size(1), rw = importance.size(2);
  // Positions as starts of image 0 (n = 0), bounds-checked against one image's volume.
  const at::Tensor starts = at::cat({at::zeros({positions.size(0), 1}, positions.options()), positions}, 1);
  const std::vector<Start> st = read_starts(starts, {1, 1, D, H, W}, rd, rh, rw, op);
  if (output.numel() == 0) return;
  float* out = output.data_ptr<float>();
  const float* imp = importance.data_ptr<float>();
  const int64_t plane = H * W;
  // One task per z: the weight plane is summed in a per-thread scratch plane (it stays in cache and is
  // never stored), then divides that plane of every image and channel.
  at::parallel_for(0, D, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> weight(static_cast<size_t>(plane));
    for (int64_t z = begin; z < end; ++z) {
      std::fill(weight.begin(), weight.end(), 0.0f);
      accumulate_plane<float>(weight.data(), W, nullptr, 0, imp, st.data(), static_cast<int64_t>(st.size()), 0,
                              z, rd, rh, rw);
      for (int64_t nc = 0; nc < N * C; ++nc) normalize_plane(out + (nc * D + z) * plane, weight.data(), plane);
    }
  });
}

}  // namespace prostate_kernels
