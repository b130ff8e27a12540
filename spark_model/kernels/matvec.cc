// Matrix-vector products for the decode step on CPU (XLA FFI handlers).
//
// Why a kernel: at batch 1 every layer product is a (1, K) x (K, N) GEMV over a few hundred
// KB of weights, and XLA:CPU runs each on one thread at about 27 GB/s here. These split each
// product over XLA's intra-op threads and stream the weight in memory order.
//
//   SparkMatVec:  x (M, K) f32, weights w_i (K, N_i) f32 -> x @ w_i (M, N_i) for each i,
//                 in one call (q/k/v, gate/up share x): K split over threads
//   SparkMatVecT: x (M, K) f32, w (N, K) f32 -> x @ w^T (M, N): N split over threads
//
// Both read each weight row once per call whatever M is, so a few rows (M <= 8) cost little
// more than one.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t MAX_M = 8;
constexpr int64_t SERIAL_BELOW = 32 * 1024;  // weight elements below which one thread runs
constexpr int64_t MIN_ROWS_PER_UNIT = 64;

// y[m, :] = sum over k in [k0, k1) of x[m, k] * w[k, :]; four weight rows per pass so the
// partial row y[m, :] (in L1) is loaded and stored once per four rows streamed.
void rows_kn(const float* __restrict x, const float* __restrict w, float* __restrict y,
             int64_t m_n, int64_t k_n, int64_t n_n, int64_t k0, int64_t k1) {
  std::fill(y, y + m_n * n_n, 0.f);
  int64_t k = k0;
  for (; k + 4 <= k1; k += 4) {
    const float* __restrict w0 = w + k * n_n;
    const float* __restrict w1 = w0 + n_n;
    const float* __restrict w2 = w1 + n_n;
    const float* __restrict w3 = w2 + n_n;
    for (int64_t m = 0; m < m_n; ++m) {
      const float* xm = x + m * k_n + k;
      const float a0 = xm[0], a1 = xm[1], a2 = xm[2], a3 = xm[3];
      float* __restrict ym = y + m * n_n;
      for (int64_t n = 0; n < n_n; ++n) ym[n] += a0 * w0[n] + a1 * w1[n] + a2 * w2[n] + a3 * w3[n];
    }
  }
  for (; k < k1; ++k) {
    const float* __restrict w0 = w + k * n_n;
    for (int64_t m = 0; m < m_n; ++m) {
      const float a = x[m * k_n + k];
      float* __restrict ym = y + m * n_n;
      for (int64_t n = 0; n < n_n; ++n) ym[n] += a * w0[n];
    }
  }
}

// y[m, n] = dot(x[m, :], w[n, :]) for n in [n0, n1).
void rows_nk(const float* __restrict x, const float* __restrict w, float* __restrict y,
             int64_t m_n, int64_t k_n, int64_t n_n, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const float* __restrict wn = w + n * k_n;
    for (int64_t m = 0; m < m_n; ++m) {
      const float* __restrict xm = x + m * k_n;
      float s = 0.f;
      for (int64_t k = 0; k < k_n; ++k) s += xm[k] * wn[k];
      y[m * n_n + n] = s;
    }
  }
}

ffi::Error check_x(const ffi::Buffer<ffi::F32>& x, int64_t& m_n, int64_t& k_n) {
  const auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("matvec: expected x (M, K)");
  m_n = xd[0];
  k_n = xd[1];
  if (m_n > MAX_M) return ffi::Error::InvalidArgument("matvec: more than 8 rows");
  return ffi::Error::Success();
}

int64_t workers_for(ffi::ThreadPool& pool, int64_t weight_elems, int64_t rows) {
  if (weight_elems < SERIAL_BELOW) return 1;
  return std::clamp<int64_t>(pool.num_threads(), 1, std::max<int64_t>(rows / MIN_ROWS_PER_UNIT, 1));
}

ffi::Error MatVec(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::RemainingArgs ws,
                  ffi::RemainingRets outs) {
  int64_t m_n, k_n;
  if (auto err = check_x(x, m_n, k_n); err.failure()) return err;
  if (ws.size() == 0 || ws.size() != outs.size())
    return ffi::Error::InvalidArgument("matvec: expected one output per weight");
  const int64_t n_w = static_cast<int64_t>(ws.size());
  std::vector<const float*> w_p(n_w);
  std::vector<float*> y_p(n_w);
  std::vector<int64_t> n_of(n_w), y_off(n_w + 1, 0);  // y_off: prefix sums of M * N_i
  for (int64_t i = 0; i < n_w; ++i) {
    auto w = ws.get<ffi::Buffer<ffi::F32>>(i);
    auto y = outs.get<ffi::Buffer<ffi::F32>>(i);
    if (w.has_error()) return w.error();
    if (y.has_error()) return y.error();
    const auto wd = w->dimensions();
    if (wd.size() != 2 || wd[0] != k_n)
      return ffi::Error::InvalidArgument("matvec: each weight must be (K, N) with x's K");
    w_p[i] = w->typed_data();
    y_p[i] = (*y)->typed_data();
    n_of[i] = wd[1];
    y_off[i + 1] = y_off[i] + m_n * n_of[i];
  }
  const int64_t units = workers_for(pool, k_n * y_off[n_w] / std::max<int64_t>(m_n, 1), k_n);
  // Unit 0 writes the outputs; the others write partial sums, added in at the end.
  std::vector<float> partial((units - 1) * y_off[n_w]);
  spark::parallel_units(pool, units, units, [&](int64_t u) {
    const int64_t k0 = k_n * u / units, k1 = k_n * (u + 1) / units;
    for (int64_t i = 0; i < n_w; ++i) {
      float* dst = u == 0 ? y_p[i] : partial.data() + (u - 1) * y_off[n_w] + y_off[i];
      rows_kn(x.typed_data(), w_p[i], dst, m_n, k_n, n_of[i], k0, k1);
    }
  });
  for (int64_t u = 1; u < units; ++u) {
    for (int64_t i = 0; i < n_w; ++i) {
      const float* p = partial.data() + (u - 1) * y_off[n_w] + y_off[i];
      for (int64_t j = 0; j < m_n * n_of[i]; ++j) y_p[i][j] += p[j];
    }
  }
  return ffi::Error::Success();
}

ffi::Error MatVecT(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> out) {
  int64_t m_n, k_n;
  if (auto err = check_x(x, m_n, k_n); err.failure()) return err;
  const auto wd = w.dimensions();
  if (wd.size() != 2 || wd[1] != k_n)
    return ffi::Error::InvalidArgument("matvec: the weight must be (N, K) with x's K");
  const int64_t n_n = wd[0];
  const int64_t units = workers_for(pool, k_n * n_n, n_n);
  spark::parallel_units(pool, units, units, [&](int64_t u) {
    rows_nk(x.typed_data(), w.typed_data(), out->typed_data(), m_n, k_n, n_n,
            n_n * u / units, n_n * (u + 1) / units);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparkMatVec, MatVec,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x (M, K)
                                  .RemainingArgs()                // w_i (K, N_i)
                                  .RemainingRets());              // x @ w_i (M, N_i)

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparkMatVecT, MatVecT,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x (M, K)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w (N, K)
                                  .Ret<ffi::Buffer<ffi::F32>>());  // (M, N)
