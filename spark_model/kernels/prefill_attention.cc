// Causal attention of many queries over the KV cache, for prefill chunks on CPU (an XLA FFI
// handler).
//
// Why a kernel: in XLA ops a prefill chunk's attention forms each (queries x keys) score
// block in memory and passes over it several times (mask, max, exp, sum), and scores the
// blocks above the diagonal too. For a 1,000-token prompt of SmolLM2 on this 2-core machine
// that was about 630 ms of a 1,100 ms time to first token, more than all the layers'
// products. This kernel keeps a block of scores in registers and L1, skips the keys no
// query of a block can see, and splits the work over XLA's intra-op threads.
//
// Axis letters as in spark_model: B batch, R cache rows (>= B), K kv heads, G query heads per
// kv head, T queries per sequence, S cache positions, H head dim.
//
//   q    (B, K, G, T, H) f32, already scaled by 1/sqrt(H)
//   k, v (R, K, S, H)    f32: the cache (the chunk's own keys already written); row b < B
//                        belongs to sequence b
//   pos  (B, T)          s32: query (b, t) attends to cache positions 0 .. pos[b, t]
//   out  (B, K, G, T, H) f32
//
// Method: the keys any query sees are first transposed by blocks of 32 (in parallel, once
// per call). A unit of work is then (b, kv head, 16 consecutive queries), all G query heads
// of them (G x 16 rows sharing every key block): 4 rows' scores against a block of 32 keys
// are 8 vector accumulators; then an online softmax
// per row (running max and sum, rescaling the row's output), and the probabilities times
// the block's values, 4 rows at a time. Keys past a row's position get probability zero,
// and blocks past the unit's furthest query are never read. float32 throughout: the result
// differs from the XLA path (kv_cache.blocked_attention) only by float rounding and this
// file's exp (relative error below 2e-7 on the arguments softmax gives it).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <immintrin.h>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

#if defined(__AVX512F__)
#define SPARK_PREFILL_AVX512 1
#else
#define SPARK_PREFILL_AVX512 0
#endif

namespace {

constexpr int64_t QB = 16;     // queries per unit of work
constexpr int64_t KB = 32;     // keys per block
constexpr int64_t MAX_H = 256;
constexpr int64_t MAX_ROWS = 16 * QB;  // G * QB, G <= 16
constexpr float LOW = -1e30f;  // below any score, and exp(LOW - finite) is 0

#if SPARK_PREFILL_AVX512
// e^x for x <= 0 (softmax arguments): 2^(x log2 e) split into 2^n 2^f, f in [-1/2, 1/2],
// with 2^f's Taylor polynomial to degree 7 (truncation below 1e-8 relative); x at or below
// -87 gives 0.
inline __m512 exp_neg(__m512 x) {
  const __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)),
                                 _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.525273380e-05f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.540353039e-04f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.333355815e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618129108e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550410866e-02f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402265070e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931471806e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  const __m512 r = _mm512_scalef_ps(p, n);
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GT_OQ), r);
}
#endif

// Scores of rows [r0, r0 + 4) against the block's keys: s[r][j] = q_r . k_j, kT (H x KB).
template <int64_t H>
inline void scores4(const float* const* qr, const float* kT, int64_t h_n, float (*s)[KB]) {
#if SPARK_PREFILL_AVX512
  __m512 a[4][2];
  for (int i = 0; i < 4; ++i) a[i][0] = a[i][1] = _mm512_setzero_ps();
  const int64_t hn = H ? H : h_n;
  for (int64_t h = 0; h < hn; ++h) {
    const __m512 k0 = _mm512_loadu_ps(kT + h * KB), k1 = _mm512_loadu_ps(kT + h * KB + 16);
    for (int i = 0; i < 4; ++i) {
      const __m512 qv = _mm512_set1_ps(qr[i][h]);
      a[i][0] = _mm512_fmadd_ps(qv, k0, a[i][0]);
      a[i][1] = _mm512_fmadd_ps(qv, k1, a[i][1]);
    }
  }
  for (int i = 0; i < 4; ++i) {
    _mm512_storeu_ps(s[i], a[i][0]);
    _mm512_storeu_ps(s[i] + 16, a[i][1]);
  }
#else
  const int64_t hn = H ? H : h_n;
  for (int i = 0; i < 4; ++i) {
    for (int64_t j = 0; j < KB; ++j) s[i][j] = 0.f;
    for (int64_t h = 0; h < hn; ++h)
      for (int64_t j = 0; j < KB; ++j) s[i][j] += qr[i][h] * kT[h * KB + j];
  }
#endif
}

// o[r] = o[r] * alpha[r] + sum_j p[r][j] v_j for 4 rows, j < nk.
template <int64_t H>
inline void values4(float* const* o, const float* alpha, const float (*p)[KB], const float* v,
                    int64_t nk, int64_t h_n) {
  const int64_t hn = H ? H : h_n;
#if SPARK_PREFILL_AVX512
  for (int64_t h0 = 0; h0 < hn; h0 += 64) {  // 4 rows x 64 dims in 16 registers
    const int64_t w = std::min<int64_t>(64, hn - h0) / 16;
    __m512 acc[4][4];
    for (int i = 0; i < 4; ++i)
      for (int c = 0; c < w; ++c)
        acc[i][c] = _mm512_mul_ps(_mm512_loadu_ps(o[i] + h0 + 16 * c), _mm512_set1_ps(alpha[i]));
    for (int64_t j = 0; j < nk; ++j) {
      const float* vj = v + j * hn + h0;
      __m512 vv[4];
      for (int c = 0; c < w; ++c) vv[c] = _mm512_loadu_ps(vj + 16 * c);
      for (int i = 0; i < 4; ++i) {
        const __m512 pv = _mm512_set1_ps(p[i][j]);
        for (int c = 0; c < w; ++c) acc[i][c] = _mm512_fmadd_ps(pv, vv[c], acc[i][c]);
      }
    }
    for (int i = 0; i < 4; ++i)
      for (int c = 0; c < w; ++c) _mm512_storeu_ps(o[i] + h0 + 16 * c, acc[i][c]);
  }
#else
  for (int i = 0; i < 4; ++i) {
    for (int64_t h = 0; h < hn; ++h) o[i][h] *= alpha[i];
    for (int64_t j = 0; j < nk; ++j)
      for (int64_t h = 0; h < hn; ++h) o[i][h] += p[i][j] * v[j * hn + h];
  }
#endif
}

// Online softmax of one row over a block: s (KB scores, the first `vis` visible) -> p, and
// the row's running max m and sum l; returns alpha, the factor for its earlier output.
inline float softmax_step(const float* s, int64_t vis, float* p, float& m, float& l) {
#if SPARK_PREFILL_AVX512
  __m512 mxv = _mm512_set1_ps(m);
  for (int64_t j0 = 0; j0 < vis; j0 += 16) {
    const __mmask16 keep = static_cast<__mmask16>(vis - j0 >= 16 ? 0xFFFF : (1u << (vis - j0)) - 1);
    mxv = _mm512_mask_max_ps(mxv, keep, mxv, _mm512_loadu_ps(s + j0));
  }
  const float mx = _mm512_reduce_max_ps(mxv);
  const __m512 mv = _mm512_set1_ps(mx);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j0 = 0; j0 < KB; j0 += 16) {
    const __mmask16 keep = static_cast<__mmask16>(
        vis - j0 >= 16 ? 0xFFFF : vis - j0 <= 0 ? 0 : (1u << (vis - j0)) - 1);
    const __m512 e = _mm512_maskz_mov_ps(keep, exp_neg(_mm512_sub_ps(_mm512_loadu_ps(s + j0), mv)));
    _mm512_storeu_ps(p + j0, e);
    sum = _mm512_add_ps(sum, e);
  }
  const float alpha = _mm512_cvtss_f32(exp_neg(_mm512_set1_ps(m - mx)));
  l = l * alpha + _mm512_reduce_add_ps(sum);
#else
  float mx = m;
  for (int64_t j = 0; j < vis; ++j) mx = std::max(mx, s[j]);
  float add = 0.f;
  for (int64_t j = 0; j < KB; ++j) {
    p[j] = j < vis ? std::exp(s[j] - mx) : 0.f;
    add += p[j];
  }
  const float alpha = std::exp(m - mx);
  l = l * alpha + add;
#endif
  m = mx;
  return alpha;
}

// kT: the keys of this (b, kv head) transposed by blocks, kT[(kb / KB) * H * KB + h * KB + j]
// = k[kb + j][h] (zero past the last position any query of the call sees).
template <int64_t H>
void attend_unit(const float* q, const float* kT_all, const float* v, const int32_t* pos,
                 int64_t g_n, int64_t t_n, int64_t h_n, int64_t s_n, int64_t t0, float* out) {
  const int64_t hn = H ? H : h_n;
  const int64_t nq = std::min(QB, t_n - t0);
  const int64_t rows = g_n * QB;  // row g * QB + i: head g, query t0 + i (i < nq real)
  thread_local std::vector<float> o_buf(MAX_ROWS * MAX_H);  // too big for a pool thread's stack
  thread_local std::vector<float> p_buf(MAX_ROWS * KB);
  float* o = o_buf.data();
  float (*p)[KB] = reinterpret_cast<float (*)[KB]>(p_buf.data());
  alignas(64) float s[4][KB];
  float m[MAX_ROWS], l[MAX_ROWS], alpha[MAX_ROWS];
  int64_t last[MAX_ROWS];  // the row's last visible position (-1: none)
  const float* qr[MAX_ROWS];
  float* orow[MAX_ROWS];
  int64_t furthest = -1;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t g = r / QB, i = r % QB;
    const bool real = i < nq;
    last[r] = real ? std::min<int64_t>(pos[t0 + i], s_n - 1) : -1;
    furthest = std::max(furthest, last[r]);
    qr[r] = q + (g * t_n + t0 + (real ? i : 0)) * hn;
    orow[r] = o + r * hn;
    m[r] = LOW;
    l[r] = 0.f;
  }
  std::memset(o, 0, rows * hn * sizeof(float));
  for (int64_t kb = 0; kb <= furthest; kb += KB) {
    const int64_t nk = std::min<int64_t>(KB, furthest + 1 - kb);
    const float* kT = kT_all + (kb / KB) * hn * KB;
    for (int64_t r0 = 0; r0 < rows; r0 += 4) {
      scores4<H>(qr + r0, kT, hn, s);
      for (int i = 0; i < 4; ++i) {
        const int64_t r = r0 + i;
        const int64_t vis = std::clamp<int64_t>(last[r] - kb + 1, 0, nk);
        if (vis == 0) {  // nothing visible in this block: the row is unchanged
          alpha[r] = 1.f;
          std::fill(p[r], p[r] + KB, 0.f);
          continue;
        }
        alpha[r] = softmax_step(s[i], vis, p[r], m[r], l[r]);
      }
    }
    for (int64_t r0 = 0; r0 < rows; r0 += 4)
      values4<H>(orow + r0, alpha + r0, p + r0, v + kb * hn, nk, hn);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t g = r / QB, i = r % QB;
    if (i >= nq) continue;
    const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
    float* dst = out + (g * t_n + t0 + i) * hn;
    for (int64_t h = 0; h < hn; ++h) dst[h] = orow[r][h] * inv;
  }
}

using UnitFn = void (*)(const float*, const float*, const float*, const int32_t*, int64_t,
                        int64_t, int64_t, int64_t, int64_t, float*);

UnitFn pick_unit(int64_t h_n) {
  if (h_n == 64) return attend_unit<64>;
  if (h_n == 128) return attend_unit<128>;
  return attend_unit<0>;
}

ffi::Error PrefillAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                            ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                            ffi::Buffer<ffi::S32> pos, ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(),
             pd = pos.dimensions();
  if (qd.size() != 5 || kd.size() != 4 || vd.size() != 4 || pd.size() != 2 ||
      !std::equal(kd.begin(), kd.end(), vd.begin()))
    return ffi::Error::InvalidArgument(
        "prefill_attention: expected q (B,K,G,T,H), k and v (R,K,S,H), pos (B,T)");
  const int64_t b_n = qd[0], k_n = qd[1], g_n = qd[2], t_n = qd[3], h_n = qd[4];
  const int64_t r_n = kd[0], s_n = kd[2];
  if (kd[1] != k_n || kd[3] != h_n || r_n < b_n || pd[0] != b_n || pd[1] != t_n)
    return ffi::Error::InvalidArgument("prefill_attention: q, cache and pos shapes disagree");
  if (g_n * QB > MAX_ROWS || h_n > MAX_H || h_n % 16 != 0)
    return ffi::Error::InvalidArgument(
        "prefill_attention: at most 16 query heads per kv head and a head dim of 16..256 "
        "in steps of 16");
  const int64_t q_blocks = (t_n + QB - 1) / QB;
  const int64_t n_units = b_n * k_n * q_blocks;
  const UnitFn unit = pick_unit(h_n);
  const float* q_p = q.typed_data();
  const float* k_p = k.typed_data();
  const float* v_p = v.typed_data();
  const int32_t* pos_p = pos.typed_data();
  float* o_p = out->typed_data();
  // Keys any query of the call sees, transposed once per (b, kv head) and block of KB
  // (every unit of that (b, kv head) reads them), in parallel.
  int64_t furthest = 0;
  for (int64_t i = 0; i < b_n * t_n; ++i)
    furthest = std::max<int64_t>(furthest, std::min<int64_t>(int64_t{pos_p[i]} + 1, s_n));
  const int64_t k_blocks = (furthest + KB - 1) / KB;
  std::vector<float> kT(b_n * k_n * k_blocks * h_n * KB);
  spark::parallel_units(pool, b_n * k_n * k_blocks, pool.num_threads(), [&](int64_t u) {
    const int64_t bk = u / k_blocks, kb = (u % k_blocks) * KB;
    const float* src = k_p + bk * s_n * h_n;  // b * k_n + kh == bk
    float* dst = kT.data() + u * h_n * KB;
    const int64_t nk = std::min<int64_t>(KB, furthest - kb);
    for (int64_t j = 0; j < KB; ++j)
      for (int64_t h = 0; h < h_n; ++h) dst[h * KB + j] = j < nk ? src[(kb + j) * h_n + h] : 0.f;
  });
  // Later query blocks see more keys: hand them out first, so the last units are short.
  spark::parallel_units(pool, n_units, pool.num_threads(), [&](int64_t u) {
    const int64_t qb = q_blocks - 1 - u % q_blocks, bk = u / q_blocks;
    const int64_t b = bk / k_n, kh = bk % k_n;
    const int64_t cache_off = (b * k_n + kh) * s_n * h_n;
    unit(q_p + bk * g_n * t_n * h_n, kT.data() + bk * k_blocks * h_n * KB, v_p + cache_off,
         pos_p + b * t_n, g_n, t_n, h_n, std::min(s_n, furthest), qb * QB,
         o_p + bk * g_n * t_n * h_n);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparkPrefillAttention, PrefillAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q (B, K, G, T, H)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k cache
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v cache
                                  .Arg<ffi::Buffer<ffi::S32>>()   // pos (B, T)
                                  .Ret<ffi::Buffer<ffi::F32>>());  // out (B, K, G, T, H)
