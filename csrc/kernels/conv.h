// Direct 2-D convolution kernels for the CPU (NHWC activations, HWIO kernels), framework-agnostic.
//
// Why: XLA:CPU runs a convolution's forward at roughly PyTorch's (oneDNN's) speed but its backward,
// above all the kernel gradient, 1.5-3x slower (bench/README.md, "Native CPU convolution"). These
// kernels compute
//
//   forward          y[b, ho, wo, co]  = sum_{i, j, ci} x[b, ho*sh + i - ph, wo*sw + j - pw, ci] * w[i, j, ci, co]
//   kernel gradient  dw[i, j, ci, co]  = sum_{b, ho, wo} x[b, ho*sh + i - ph, wo*sw + j - pw, ci] * dy[b, ho, wo, co]
//
// (out-of-range x reads are zeros) as "indirect GEMMs": no im2col buffer, the rows of x are read in
// place through per-pixel, per-tap row pointers. The input gradient of a stride-1 conv is the forward
// of dy with the spatially flipped, in/out-transposed kernel and padding k - 1 - p (tsjax/ops/conv.py).
//
// Precision: float32 in, float32 out, float32 accumulation (fused multiply-adds). Results do not depend on
// the thread count: every output element is owned by one work item and summed in a fixed order.
//
// Instruction sets: AVX-512F (16-wide) or AVX2+FMA (8-wide) micro-kernels, chosen at run time from the
// CPU's features (kernels/cpu_isa.h). The caller provides the parallel loop (XLA's intra-op pool in the FFI
// handler, plain threads in tests).
#pragma once

#include <cstdint>

#include "kernels/cpu_isa.h"
#include "kernels/parallel.h"

namespace tsjax {

struct ConvParams {
  int64_t batch, h, w, ci;   // input  [batch, h, w, ci]
  int64_t ho, wo, co;        // output [batch, ho, wo, co]
  int64_t kh, kw;            // kernel [kh, kw, ci, co]
  int64_t sh, sw;            // strides
  int64_t ph, pw;            // leading (top / left) padding; trailing padding follows from ho / wo
  // false: w is [kh, kw, ci, co]. true: w is [kh, kw, co, ci], the kernel of the transposed conv, used
  // flipped: this conv's w[i][j][c][o] is w[kh-1-i][kw-1-j][o][c] (the input gradient of a stride-1 conv
  // is the forward of dy with the original kernel read this way).
  bool flip = false;
};

// y = conv(x, w) as above. `isa` must not exceed CpuBestIsa(). Scratch: packed weights (kh*kw*ci*co
// floats, rounded up to 64 output channels), taken from a process-wide set of buffers that keeps up to
// 256 MiB between calls (re-faulting a fresh buffer of that size on every call is measurable).
// `threads` as ConvKernelGradCpu's: it only decides how finely the work is split, never the result.
void ConvForwardCpu(const ConvParams& p, const float* x, const float* w, float* y, CpuIsa isa,
                    const ParallelFor& parallel_for, int64_t threads = 0);

// dw = kernel gradient as above (dw is overwritten). `threads`: how many threads parallel_for runs its items
// on (0: not known, taken as 4); it only decides how finely the work is split, never the result.
void ConvKernelGradCpu(const ConvParams& p, const float* x, const float* dy, float* dw, CpuIsa isa,
                       const ParallelFor& parallel_for, int64_t threads = 0);

// y = conv(x, w) for a 3x3, stride-1 conv by Winograd's minimal filtering F(m x m, 3 x 3), m = 2 or 4
// (conv_winograd_impl.h): 2.25x (m = 2) or 4x (m = 4) fewer multiplies than the direct forward, run as
// alpha^2 = (m + 2)^2 GEMMs of [tiles, ci] x [ci, co] on the forward's micro-kernels between an input
// transform (per tile, vectorised over ci) and an output transform. ci and co must be multiples of 16;
// p.flip as ConvForwardCpu (the input gradient's kernel). Precision: float32 throughout; the transforms add
// rounding: against a float64 reference, m = 2 stays within the direct forward's error, m = 4 is 10-50x it
// (up to ~2.4e-5 of the output scale; tests/ops/test_conv.py bounds both). Results do not
// depend on the thread count or the instruction set. Scratch: the transformed kernel (alpha^2 * ci * co
// floats) and the packed kernel from the forward's buffer set; per thread, one block of transformed tiles.
void ConvForwardWinogradCpu(const ConvParams& p, int m, const float* x, const float* w, float* y, CpuIsa isa,
                            const ParallelFor& parallel_for, int64_t threads = 0);

// y = conv(x, w) for bfloat16 x and w (raw bf16 bits), stride 1, on AMX tiles (conv_cpu_amx.cc); y is
// bf16 (y_bf16) or float32; float32 accumulation. Call only when CpuAmxBf16().
void ConvForwardBf16Amx(const ConvParams& p, const uint16_t* x, const uint16_t* w, void* y, bool y_bf16,
                        const ParallelFor& parallel_for);

namespace conv_detail {

// Width of a packed weight panel (output channels) and the forward micro-tile height (output pixels).
constexpr int kPanel = 64;
constexpr int kMr = 6;

// One forward micro-tile: up to kMr output pixels x one panel (nvec16 x 16 output channels).
//   a[t * kMr + m]  row pointer (ci contiguous floats) of pixel m for tap t, t in [0, ntaps)
//   b               weights: b[t * tap_stride + c * ldb + n], c in [0, nci), n < nvec16 * 16
//   c               output rows, row stride ldc; accumulate: add to c instead of overwriting
struct FwdTile {
  const float* const* a;
  int ntaps;
  int64_t c0, nci;
  const float* b;
  int64_t tap_stride, ldb;
  float* c;
  int64_t ldc;
  int mr, nvec16;
  bool accumulate;
};

// A run of pixels of the kernel gradient: x rows x0 + k * xstride and dy rows dy0 + k * dystride,
// k in [0, n) (one output row's pixels that read valid input for one tap).
struct GradRun {
  const float* x0;
  int64_t xstride;
  const float* dy0;
  int64_t dystride;
  int64_t n;
};

void FwdTileAvx512(const FwdTile& t);
void FwdTileAvx2(const FwdTile& t);
// Winograd transforms (conv_winograd_impl.h); m = 2 or 4, alpha = m + 2, k = xi * alpha + nu.
// Input: v[k * plane + c] = (B^T d B)[k], d the alpha x alpha tile whose rows (ci floats) are src[i * alpha + j].
struct WinoInput {
  int m;
  const float* const* src;
  int64_t ci;
  float* v;
  int64_t plane;
};
// Kernel: u[k * plane + c * kPanel + n] = (G g G^T)[k] for c in [c0, c1), g one packed 3x3 panel
// g[tap][c][kPanel] (ci channels).
struct WinoKernel {
  int m;
  const float* g;
  int64_t ci, c0, c1;
  float* u;
  int64_t plane;
};
// Output: dst[r * m + s][n] = (A^T M A)[r][s], M[k] = mm + k * plane, n < nvec16 * 16 (null dst rows skipped).
struct WinoOutput {
  int m;
  const float* mm;
  int64_t plane;
  float* const* dst;
  int nvec16;
};
void WinoInputAvx512(const WinoInput& t);
void WinoInputAvx2(const WinoInput& t);
void WinoKernelAvx512(const WinoKernel& t);
void WinoKernelAvx2(const WinoKernel& t);
void WinoOutputAvx512(const WinoOutput& t);
void WinoOutputAvx2(const WinoOutput& t);

// One kernel-gradient micro-tile: acc[m][n] (row stride kPanel) += sum over the runs' pixels of
// x_row[xoff + m] * dy_row[dyoff + n], m < mr <= kMr input channels, n < nvec16 * 16 output channels.
void GradTileAvx512(const GradRun* runs, int nruns, int64_t xoff, int64_t dyoff, int mr, int nvec16, float* acc);
void GradTileAvx2(const GradRun* runs, int nruns, int64_t xoff, int64_t dyoff, int mr, int nvec16, float* acc);

}  // namespace conv_detail
}  // namespace tsjax
