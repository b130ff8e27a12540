// Products of a few activation rows with a block-quantized weight (XLA FFI handler).
//
// Why a kernel: a decode step's time is the bytes of weights it reads, and a packed weight
// (spark_model/quant.py: q8_0, q4_0, q4_1; 32 weights per block with a float16 scale) is
// 2 to 7 times smaller than float32. XLA can only expand it to float32 and then multiply,
// reading and writing more than the float32 product would. This kernel streams the packed
// bytes once and multiplies them as integers.
//
//   SparkQMatVec: x (M, K) f32 (M <= 256, in passes of 8 rows over each part of the
//                 weights), then for each of W weights of one format (attr
//                 fmt) and one layout (packed_args.h: rows, or interleaved groups of 16
//                 rows) qs_i, d_i, m_i -> y_i (M, N_i) f32, y_i[r, n] = sum_k x[r, k] w_i[n, k].
//
// A loaded model holds its matrices interleaved (quant.interleave) wherever N is a multiple
// of 16: there a block's dot products for 16 rows fill one vector (groups_vnni), so the
// scaling and the sums across lanes that the row layout pays per row (rows_vnni) are paid
// once per 16 rows.
//
// Several weights that share x (a block's q, k and v; gate and up) go in one call: x is
// rounded once, and the rows of all of them are split over the threads together, so one
// thread hand-off serves them all (a decode step of SmolLM2 makes 4 calls per layer, not 7).
//
// The activation rows are rounded once per call, per 32-block, to int8 with their own
// scale d_x = amax/127 (round to nearest even), as llama.cpp does; then each block's product
// is an integer dot product (AVX512-VNNI vpdpbusd: unsigned bytes x signed bytes) scaled by
// d_w * d_x. The unsigned operand is the weight: the 4-bit quants are 0..15 as stored, and
// q8_0's int8 quants become q + 128 by flipping their sign bit; the offsets (8 for q4_0,
// 128 for q8_0) times the block's sum of activation quants are subtracted in the integer
// accumulator. q4_1's minimum adds m * d_x * (sum of the block's activation quants), so the
// whole product is that of the rounded activations.
//
// Error: only the activation rounding, |x - d_x q_x| <= d_x / 2 = amax_b / 254 per element,
// so |y - exact| <= sum_b amax_b(x) / 254 * sum_j |w_j| plus float32 rounding of the
// per-block terms (tests/test_quant.py checks this bound). (Adding q4_1's minimum times the
// exact sum of x instead would leave m * sum_j (x_j - d_x q_x,j) in the error, which on
// real weights, whose blocks straddle zero, is larger.)
//
// Each output row i depends only on x's row i, computed by the same code whatever M is: a
// row's result is bitwise the same in a call with 1 row or 8 (speculative decoding relies
// on that).
//
// Measured in the row layout (eval/bench_quant.py, 2 busy cores, medians of 3 runs), one
// row: 1536 x 576 in 30 / 25 / 30 us for q8_0 / q4_0 / q4_1 against 56 us for f32 (x1.9,
// x2.3, x1.8); the 49152 x 576 output projection in 1.08 / 0.54 / 0.75 ms against 4.2 ms.
// Per 64 bytes of quants a step spends about a dozen 512-bit operations (unpack, scale
// expansion, dot, convert, scale), plus a sum across lanes per row: the interleaved layout
// spends about half as many.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <immintrin.h>

#include "packed_args.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int MAX_M = 8;             // activation rows per pass over the weight
constexpr int64_t MAX_CALL_ROWS = 256;  // rows per call: passes of 8 over each unit's rows
constexpr int64_t QK = 32;
constexpr int64_t SERIAL_BELOW = 64 * 1024;  // weights below which one thread runs
constexpr int64_t MIN_ROWS_PER_UNIT = 16;

// The VNNI path where the CPU has it (define SPARK_QMATVEC_PORTABLE to build the portable
// loops instead, e.g. to check them).
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512VNNI__) && !defined(SPARK_QMATVEC_PORTABLE)
#define SPARK_QMATVEC_VNNI 1
#else
#define SPARK_QMATVEC_VNNI 0
#endif

enum Fmt : int32_t { Q8_0 = 0, Q4_0 = 1, Q4_1 = 2 };

// One weight of a call: its arrays and where its output goes.
using Weight = spark::PackedWeight;

// One step of the weight loop covers a 64-byte vector of quants: 2 blocks of q8_0 (8 int32
// lanes each) or 4 blocks of a 4-bit format (4 lanes each, low and high nibbles).
inline int64_t blocks_per_step(Fmt f) { return f == Q8_0 ? 2 : 4; }

// The activation rows, quantized and laid out to match the weight loop's steps. Blocks past
// K (padding of the last step) are zero throughout, so they add nothing.
struct Acts {
  int64_t steps = 0;
  std::vector<int8_t> q;     // per row, per step: 64 (q8_0) or 128 (low then high) bytes
  std::vector<float> dx;     // per row, per step: 16 lanes, each its block's d_x
  std::vector<int32_t> off;  // per row, per step: 16 lanes, -offset * sum(q_x) in a
                             // block's first lane, else 0
  std::vector<float> sx;     // per row, per step: 4 blocks' d_x * sum(q_x) (q4_1)
  int64_t q_row, v_row, s_row;
};

// Rounds one block of 32 activations to int8 with scale amax/127 (to nearest even, the
// default rounding mode, in both versions). Tiny blocks use amax >= 1e-30 so that the
// reciprocal stays finite (the error stays below 1e-30 / 254).
[[maybe_unused]] inline float quantize_block_portable(const float* x, int8_t* q,
                                                      int32_t* q_sum) {
  float amax = 0.f;
  for (int j = 0; j < QK; ++j) amax = std::max(amax, std::fabs(x[j]));
  amax = std::max(amax, 1e-30f);
  const float inv = 127.f / amax;
  int32_t qs = 0;
  for (int j = 0; j < QK; ++j) {
    const int v = std::clamp(static_cast<int>(std::nearbyint(x[j] * inv)), -127, 127);
    q[j] = static_cast<int8_t>(v);
    qs += v;
  }
  *q_sum = qs;
  return amax / 127.f;
}

inline float quantize_block(const float* x, int8_t* q, int32_t* q_sum) {
#if SPARK_QMATVEC_VNNI
  const __m512 a = _mm512_loadu_ps(x), b = _mm512_loadu_ps(x + 16);
  const float amax = std::max(
      _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b))), 1e-30f);
  const __m512 inv = _mm512_set1_ps(127.f / amax);
  const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, inv));  // |.| <= 127: no clamp
  const __m512i qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, inv));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtsepi32_epi8(qa));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm512_cvtsepi32_epi8(qb));
  *q_sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
  return amax / 127.f;
#else
  return quantize_block_portable(x, q, q_sum);
#endif
}

void quantize_acts(const float* x, int64_t m_n, int64_t k_n, Fmt f, Acts& a) {
  const int64_t nb = k_n / QK, g = blocks_per_step(f);
  const int64_t lanes = 16 / g;  // int32 lanes per block
  const int32_t offset = f == Q8_0 ? 128 : f == Q4_0 ? 8 : 0;
  a.steps = (nb + g - 1) / g;
  a.q_row = a.steps * g * QK;
  a.v_row = a.steps * 16;
  a.s_row = a.steps * 4;
  a.q.assign(m_n * a.q_row, 0);
  a.dx.assign(m_n * a.v_row, 0.f);
  a.off.assign(m_n * a.v_row, 0);
  a.sx.assign(m_n * a.s_row, 0.f);
  int8_t blk[QK];
  for (int64_t i = 0; i < m_n; ++i) {
    for (int64_t b = 0; b < nb; ++b) {
      int32_t q_sum;
      const float d = quantize_block(x + i * k_n + b * QK, blk, &q_sum);
      const int64_t s = b / g, h = b % g;
      int8_t* qd = a.q.data() + i * a.q_row + s * g * QK;
      if (f == Q8_0) {
        std::memcpy(qd + h * QK, blk, QK);
      } else {  // byte j of a block pairs weights j (low nibble) and j + 16 (high)
        std::memcpy(qd + h * 16, blk, 16);
        std::memcpy(qd + 64 + h * 16, blk + 16, 16);
      }
      for (int64_t l = 0; l < lanes; ++l) a.dx[i * a.v_row + s * 16 + h * lanes + l] = d;
      a.off[i * a.v_row + s * 16 + h * lanes] = -offset * q_sum;
      a.sx[i * a.s_row + s * 4 + h] = d * static_cast<float>(q_sum);
    }
  }
}

// The activation rows quantized per block, in weight order, for the interleaved layout and
// the portable loops.
struct BlockActs {
  std::vector<int8_t> q;     // (M, K)
  std::vector<float> dx;     // (M, K/32): d_x
  std::vector<int32_t> off;  // (M, K/32): -offset * sum(q_x)
  std::vector<float> sx;     // (M, K/32): d_x * sum(q_x) (q4_1)
};

void quantize_block_acts(const float* x, int64_t m_n, int64_t k_n, Fmt f, BlockActs& a) {
  const int64_t nb = k_n / QK;
  const int32_t offset = f == Q8_0 ? 128 : f == Q4_0 ? 8 : 0;
  a.q.resize(m_n * k_n);
  a.dx.resize(m_n * nb);
  a.off.resize(m_n * nb);
  a.sx.resize(m_n * nb);
  for (int64_t i = 0; i < m_n * nb; ++i) {
    int32_t q_sum;
    const float d = quantize_block(x + i * QK, a.q.data() + i * QK, &q_sum);
    a.dx[i] = d;
    a.off[i] = -offset * q_sum;
    a.sx[i] = d * static_cast<float>(q_sum);
  }
}

#if SPARK_QMATVEC_VNNI
// y[i, n] for n in [n0, n1), i < M: one weight row at a time, its 64-byte vectors shared by
// the M activation rows (M accumulators of 16 lanes in registers).
template <int M, Fmt F>
void rows_vnni(const Acts& a, int64_t i0, const uint8_t* qs, const uint16_t* d,
               const uint16_t* mn, float* y, int64_t k_n, int64_t n_n, int64_t n0, int64_t n1) {
  constexpr int64_t G = F == Q8_0 ? 2 : 4;
  const int64_t nb = k_n / QK;
  const int64_t row_bytes = F == Q8_0 ? k_n : k_n / 2;
  const __m512i idx = F == Q8_0
      ? _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0)
      : _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const __m512i sign = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wq = qs + n * row_bytes;
    const uint16_t* wd = d + n * nb;
    const uint16_t* wm = mn + n * nb;
    __m512 acc[M];
    __m128 acc_m[M];
    for (int i = 0; i < M; ++i) {
      acc[i] = _mm512_setzero_ps();
      acc_m[i] = _mm_setzero_ps();
    }
    for (int64_t s = 0; s < a.steps; ++s) {
      const int64_t have = std::min<int64_t>(G, nb - s * G);  // blocks in this step
      __m512i v;
      __m128i dh, mh = _mm_setzero_si128();
      if (have == G) {
        v = _mm512_loadu_si512(wq + s * 64);
        dh = F == Q8_0 ? _mm_cvtsi32_si128(*reinterpret_cast<const int32_t*>(wd + s * G))
                       : _mm_loadl_epi64(reinterpret_cast<const __m128i*>(wd + s * G));
        if (F == Q4_1) mh = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(wm + s * G));
      } else {  // the last, partial step: masked loads never touch bytes past the row
        const int64_t bytes = have * (F == Q8_0 ? QK : QK / 2);
        v = _mm512_maskz_loadu_epi8(_cvtu64_mask64((~0ULL) >> (64 - bytes)), wq + s * 64);
        const __mmask8 hm = static_cast<__mmask8>((1u << have) - 1);
        dh = _mm_maskz_loadu_epi16(hm, wd + s * G);
        if (F == Q4_1) mh = _mm_maskz_loadu_epi16(hm, wm + s * G);
      }
      const __m512 dw = _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(_mm_cvtph_ps(dh)));
      if constexpr (F == Q8_0) {
        const __m512i u = _mm512_xor_si512(v, sign);  // q + 128, unsigned
        for (int i = 0; i < M; ++i) {
          const int8_t* xq = a.q.data() + (i0 + i) * a.q_row + s * 64;
          __m512i dot = _mm512_loadu_si512(a.off.data() + (i0 + i) * a.v_row + s * 16);
          dot = _mm512_dpbusd_epi32(dot, u, _mm512_loadu_si512(xq));
          const __m512 dx = _mm512_loadu_ps(a.dx.data() + (i0 + i) * a.v_row + s * 16);
          acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(dw, dx), acc[i]);
        }
      } else {
        const __m512i lo = _mm512_and_si512(v, low4);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
        for (int i = 0; i < M; ++i) {
          const int8_t* xq = a.q.data() + (i0 + i) * a.q_row + s * 128;
          __m512i dot = _mm512_loadu_si512(a.off.data() + (i0 + i) * a.v_row + s * 16);
          dot = _mm512_dpbusd_epi32(dot, lo, _mm512_loadu_si512(xq));
          dot = _mm512_dpbusd_epi32(dot, hi, _mm512_loadu_si512(xq + 64));
          const __m512 dx = _mm512_loadu_ps(a.dx.data() + (i0 + i) * a.v_row + s * 16);
          acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(dw, dx), acc[i]);
        }
        if constexpr (F == Q4_1) {
          const __m128 mw = _mm_cvtph_ps(mh);
          for (int i = 0; i < M; ++i)
            acc_m[i] = _mm_fmadd_ps(mw, _mm_loadu_ps(a.sx.data() + (i0 + i) * a.s_row + s * 4),
                                    acc_m[i]);
        }
      }
    }
    for (int i = 0; i < M; ++i) {
      float r = _mm512_reduce_add_ps(acc[i]);
      if constexpr (F == Q4_1) {
        alignas(16) float t[4];
        _mm_store_ps(t, acc_m[i]);
        r += (t[0] + t[1]) + (t[2] + t[3]);
      }
      y[(i0 + i) * n_n + n] = r;
    }
  }
}

// The interleaved layout (packed_args.h): groups [g0, g1) of 16 weight rows. The 32-bit
// lane j of every vector belongs to row j of the group, so a block's integer dot products
// for all 16 rows land in one vector of 16 lanes (vpdpbusd against 4 activation bytes
// broadcast), one float conversion and scaling serves 16 blocks, and no sum across lanes is
// left at the end: y's 16 values are stored as they are. Measured alone on one core, a
// 1536 x 576 q4_1 product took 12.7 us against 26.8 us in the rows layout, 44 us against
// 156 us for 8 rows (standalone timing loop).
template <int M, Fmt F>
void groups_vnni(const BlockActs& a, int64_t i0, const Weight& w, int64_t k_n, int64_t g0,
                 int64_t g1) {
  constexpr int C = F == Q8_0 ? 8 : 4;  // 64-byte chunks per (group, block)
  constexpr int U = 8;                  // unsigned quant vectors per (group, block)
  const int64_t nb = k_n / QK;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const __m512i sign = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t g = g0; g < g1; ++g) {
    __m512 acc[M];
    for (int i = 0; i < M; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t gb = g * nb + b;
      const uint8_t* p = w.qs + gb * C * 64;
      // Ask for the bytes 4 KiB ahead (into L2): a core's own stream of misses does not keep
      // enough requests in flight to cover DRAM's latency. Reading 95 MB of q4_1 matrices in
      // a loop on 2 threads went from 13.5 to 27-34 GB/s with 2 or 4 KiB (standalone timing
      // loop); SmolLM2's generate loop ran at 159-166 tokens/s with 2 KiB, 167-179 with 4 or
      // 8. The addresses past the weight's end are only hints, never read.
      constexpr int64_t AHEAD = 4096 / (C * 64);  // (group, block)s ahead
      for (int t = 0; t < C; ++t)
        _mm_prefetch(reinterpret_cast<const char*>(p + AHEAD * C * 64 + t * 64), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(w.d + (gb + AHEAD) * spark::GROUP),
                   _MM_HINT_T1);
      if constexpr (F == Q4_1)
        _mm_prefetch(reinterpret_cast<const char*>(w.m + (gb + AHEAD) * spark::GROUP),
                     _MM_HINT_T1);
      // u[t] pairs with activations 4t .. 4t+3 of the block (q8_0: q + 128; 4-bit: the low
      // nibbles for t < 4, the high ones, weights 16 + 4(t - 4) .., for t >= 4).
      __m512i u[U];
      if constexpr (F == Q8_0) {
        for (int t = 0; t < C; ++t) u[t] = _mm512_xor_si512(_mm512_loadu_si512(p + t * 64), sign);
      } else {
        for (int t = 0; t < C; ++t) {
          const __m512i v = _mm512_loadu_si512(p + t * 64);
          u[t] = _mm512_and_si512(v, low4);
          u[C + t] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
        }
      }
      const __m512 dw = _mm512_cvtph_ps(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.d + gb * spark::GROUP)));
      __m512 mw = _mm512_setzero_ps();
      if constexpr (F == Q4_1)
        mw = _mm512_cvtph_ps(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.m + gb * spark::GROUP)));
      for (int i = 0; i < M; ++i) {
        const int8_t* xq = a.q.data() + (i0 + i) * k_n + b * QK;
        const int64_t ib = (i0 + i) * nb + b;
        // Two chains of dot products (even and odd vectors), joined once.
        __m512i d0 = _mm512_set1_epi32(a.off[ib]), d1 = _mm512_setzero_si512();
        for (int t = 0; t < U; t += 2) {
          int32_t x0, x1;
          std::memcpy(&x0, xq + 4 * t, 4);
          std::memcpy(&x1, xq + 4 * t + 4, 4);
          d0 = _mm512_dpbusd_epi32(d0, u[t], _mm512_set1_epi32(x0));
          d1 = _mm512_dpbusd_epi32(d1, u[t + 1], _mm512_set1_epi32(x1));
        }
        const __m512 s = _mm512_mul_ps(dw, _mm512_set1_ps(a.dx[ib]));
        acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(d0, d1)), s, acc[i]);
        if constexpr (F == Q4_1) acc[i] = _mm512_fmadd_ps(mw, _mm512_set1_ps(a.sx[ib]), acc[i]);
      }
    }
    for (int i = 0; i < M; ++i) _mm512_storeu_ps(w.y + (i0 + i) * w.n_n + g * spark::GROUP, acc[i]);
  }
}

template <int M, class Fn>
void with_rows(int64_t m_n, Fn&& fn) {
  if constexpr (M > 1) {
    if (m_n < M) return with_rows<M - 1>(m_n, fn);
  }
  fn(std::integral_constant<int, M>{});
}
#endif

// The same products in portable C++ (CPUs without AVX512-VNNI), either layout: per block
// an integer dot product, scaled as above.
[[maybe_unused]] void rows_portable(const BlockActs& a, Fmt f, const Weight& w, int64_t m_n,
                                    int64_t k_n, int64_t n0, int64_t n1) {
  const int64_t nb = k_n / QK;
  auto half = [](uint16_t h) {  // IEEE binary16 -> float
    const uint32_t sgn = (h & 0x8000u) << 16, e = (h >> 10) & 0x1F, mnt = h & 0x3FF;
    float v = e == 0 ? std::ldexp(static_cast<float>(mnt), -24)
            : e == 31 ? (mnt ? NAN : INFINITY)
                      : std::ldexp(static_cast<float>(mnt | 0x400), static_cast<int>(e) - 25);
    return sgn ? -v : v;
  };
  uint8_t buf[QK];
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t i = 0; i < m_n; ++i) {
      float r = 0.f, rm = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* wq = w.block(n, b, buf);
        const int8_t* xq = a.q.data() + i * k_n + b * QK;
        const int64_t ib = i * nb + b, sb = w.scale_index(n, b);
        int32_t dot = a.off[ib];
        for (int64_t j = 0; j < QK; ++j) {
          const int32_t q = f == Q8_0 ? static_cast<int8_t>(wq[j]) + 128
                                      : (j < 16 ? wq[j] & 0x0F : wq[j - 16] >> 4);
          dot += q * xq[j];
        }
        r += static_cast<float>(dot) * (half(w.d[sb]) * a.dx[ib]);
        if (f == Q4_1) rm += half(w.m[sb]) * a.sx[ib];
      }
      w.y[i * w.n_n + n] = r + rm;
    }
  }
}

// Rows [n0, n1) of weight w (for the interleaved layout, whole groups of 16).
void rows(const Acts& a, const BlockActs& ba, Fmt f, const Weight& w, int64_t m_n,
          int64_t k_n, int64_t n0, int64_t n1) {
#if SPARK_QMATVEC_VNNI
  (void)ba;
  for (int64_t i0 = 0; i0 < m_n; i0 += MAX_M) {  // activation rows i0 .. i0 + 7
    with_rows<MAX_M>(std::min<int64_t>(MAX_M, m_n - i0), [&](auto m) {
      constexpr int M = decltype(m)::value;
      if (w.interleaved) {
        const int64_t g0 = n0 / spark::GROUP, g1 = n1 / spark::GROUP;
        if (f == Q8_0) groups_vnni<M, Q8_0>(ba, i0, w, k_n, g0, g1);
        else if (f == Q4_0) groups_vnni<M, Q4_0>(ba, i0, w, k_n, g0, g1);
        else groups_vnni<M, Q4_1>(ba, i0, w, k_n, g0, g1);
      } else if (f == Q8_0) rows_vnni<M, Q8_0>(a, i0, w.qs, w.d, w.m, w.y, k_n, w.n_n, n0, n1);
      else if (f == Q4_0) rows_vnni<M, Q4_0>(a, i0, w.qs, w.d, w.m, w.y, k_n, w.n_n, n0, n1);
      else rows_vnni<M, Q4_1>(a, i0, w.qs, w.d, w.m, w.y, k_n, w.n_n, n0, n1);
    });
  }
#else
  (void)a;
  rows_portable(ba, f, w, m_n, k_n, n0, n1);
#endif
}

ffi::Error QMatVec(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::RemainingArgs args,
                   ffi::RemainingRets outs, int32_t fmt) {
  if (fmt < Q8_0 || fmt > Q4_1) return ffi::Error::InvalidArgument("qmatvec: unknown format");
  const Fmt f = static_cast<Fmt>(fmt);
  const auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("qmatvec: expected x (M, K)");
  const int64_t m_n = xd[0], k_n = xd[1];
  if (m_n > MAX_CALL_ROWS)
    return ffi::Error::InvalidArgument("qmatvec: more than 256 rows");
  if (k_n % QK != 0) return ffi::Error::InvalidArgument("qmatvec: K is not a multiple of 32");
  std::vector<Weight> ws;
  if (auto err = spark::packed_weights("qmatvec", args, outs, f == Q8_0, k_n, ws);
      !err.success())
    return err;
  const int64_t n_w = static_cast<int64_t>(ws.size());
  std::vector<int64_t> first(n_w + 1, 0);  // first[i]: row of weight i in all the rows
  for (int64_t i = 0; i < n_w; ++i) first[i + 1] = first[i] + ws[i].n_n;
  const int64_t total = first[n_w];
  if (m_n == 0 || total == 0) return ffi::Error::Success();
  // A call's weights share one layout (kernels.packed_linear_many groups them so); the
  // interleaved one is split over the threads in whole groups of 16 rows.
  const bool inter = ws[0].interleaved;
  for (const Weight& w : ws)
    if (w.interleaved != inter)
      return ffi::Error::InvalidArgument("qmatvec: weights of one call in different layouts");
  const int64_t unit_rows = inter ? spark::GROUP : 1;
  thread_local Acts acts;  // reused between calls: no allocation per decode step
  thread_local BlockActs block_acts;
  if (inter || !SPARK_QMATVEC_VNNI) quantize_block_acts(x.typed_data(), m_n, k_n, f, block_acts);
  else quantize_acts(x.typed_data(), m_n, k_n, f, acts);
  const int64_t total_units = total / unit_rows;  // rows, or groups of rows
  int64_t units = 1;
  if (total * k_n >= SERIAL_BELOW)
    units = std::clamp<int64_t>(4 * pool.num_threads(), 1,
                                std::max<int64_t>(total / MIN_ROWS_PER_UNIT, 1));
  units = std::min(units, total_units);
  const int64_t workers = std::min<int64_t>(units, pool.num_threads());
  const Acts& a = acts;
  const BlockActs& ba = block_acts;
  spark::parallel_units(pool, units, workers, [&](int64_t u) {
    const int64_t r0 = total_units * u / units * unit_rows;
    const int64_t r1 = total_units * (u + 1) / units * unit_rows;
    for (int64_t i = 0; i < n_w; ++i) {  // the part of [r0, r1) in weight i's rows
      const int64_t n0 = std::max(r0, first[i]) - first[i];
      const int64_t n1 = std::min(r1, first[i + 1]) - first[i];
      if (n0 < n1) rows(a, ba, f, ws[i], m_n, k_n, n0, n1);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparkQMatVec, QMatVec,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x (M, K)
                                  .RemainingArgs()  // per weight: qs, d, m in one of the
                                                    // layouts of packed_args.h
                                  .RemainingRets()  // per weight: (M, N) f32
                                  .Attr<int32_t>("fmt"));  // 0 q8_0, 1 q4_0, 2 q4_1
