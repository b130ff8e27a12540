// Products of many activation rows with block-quantized weights on AMX tiles (XLA FFI
// handler), for the prefill and full forwards of packed models.
//
// Why a kernel: a prefill chunk multiplies hundreds of rows by every weight, so its time is
// arithmetic, not bytes. Expanding a packed weight to float32 for an XLA dot (dequant.cc)
// keeps the prompt as slow as float32 weights (about 0.9 s of SmolLM2's 1.5 s for a
// 1,000-token prompt on this 2-core machine). CPUs with AMX (amx_tile, amx_bf16) multiply
// 16 x 32 by 32 x 16 bfloat16 tiles into float32 accumulators in one instruction.
//
//   SparkQMatMul: x (M, K) f32, then for each of W weights of one format (attr fmt) qs_i,
//                 d_i, m_i (d again unless q4_1) in a layout of packed_args.h
//                 -> y_i (M, N_i) f32, y_i[r, n] ~ sum_k x[r, k] w_i[n, k].
//   SparkAmxReady(): 1 where this library was built with AMX and the kernel grants the
//                 process the tile state (arch_prctl ARCH_REQ_XCOMP_PERM), else 0.
//
// Method. x is rounded to bfloat16 once per call (to nearest even), into 16 x 32 tiles
// stored whole, rows past M zero. The output columns are split into panels of 32 (two
// 16-column tiles); a thread expands a panel's weights block by block (d q, d (q - 8) or
// d q + m in float32, as dequant.cc does) into the pair-interleaved layout the tile
// instruction reads, once, as two bfloat16 parts, hi (w rounded) and lo (w - hi rounded),
// and multiplies both with every 32 rows of x: four accumulator tiles (2 x 16 rows by
// 2 x 16 columns) summed over all of K in float32. The low part doubles the products but
// cost about a third more time (the loop runs at about a fifth of the instruction's peak,
// measured alone) and keeps the weights to 2^-16: with
// the high part alone, SmolLM2's logits moved by up to 1% of their largest, and a greedy
// token after a prefilled prompt changed at a margin of 1 logit.
//
// Error: x is rounded to bfloat16 (relative error at most 2^-8), w to hi + lo (at most
// 2^-16), the products are exact and summed in float32, and subnormal inputs and results
// are flushed to zero (the instruction's rule). So
// |y - exact| <= (2^-8 + 2^-15 + K 2^-24) sum_k |x_k w_k| plus a flush floor
// (tests/test_quant.py checks it). The decode step's products (qmatvec.cc, at most 8 rows)
// round activations to int8 per block instead: a row's value here is not bitwise the same,
// and speculative verification (kernels.row_exact()) does not use this kernel. Each row's
// result is independent of the other rows of the call.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "packed_args.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && \
    defined(__AVX512BW__) && defined(__linux__)
#define SPARK_QMATMUL_AMX 1
#else
#define SPARK_QMATMUL_AMX 0
#endif

namespace {

constexpr int64_t QK = 32;      // weights per block, and bf16 values per tile row (K step)
constexpr int64_t TILE = 16;    // rows and columns of an accumulator tile
constexpr int64_t PANEL = 32;   // output columns per unit of work (two tiles)
constexpr int64_t MBLOCK = 32;  // activation rows per pass (two tiles)

enum Fmt : int32_t { Q8_0 = 0, Q4_0 = 1, Q4_1 = 2 };  // as in qmatvec.cc

bool amx_ready() {
#if SPARK_QMATMUL_AMX
  // Linux hands out AMX's 8 KB of tile state per process on request (ARCH_REQ_XCOMP_PERM,
  // feature 18 = XTILEDATA); it fails where the kernel or the CPU lacks it.
  static const bool ok = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return ok;
#else
  return false;
#endif
}

#if SPARK_QMATMUL_AMX
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-3 accumulate (rows a/b x columns a/b), 4-5 hold x, 6-7 the weight; all are
// 16 rows of 64 bytes (16 float32 or 32 bfloat16).
void configure_tiles() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}

// 32 float32 weights -> 32 bfloat16 (RNE), as 16 pairs: pair j holds weights 2j and 2j + 1.
inline __m512i to_pairs(__m512 lo, __m512 hi) {
  // vcvtne2ps2bf16 puts its second operand in the low half.
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));
}

// Block b of weight row n (either layout), expanded to float32 (lo: weights 0..15, hi:
// 16..31).
template <Fmt F>
inline void expand_block(const spark::PackedWeight& w, int64_t n, int64_t b, __m512& lo_f,
                         __m512& hi_f) {
  alignas(32) uint8_t buf[QK];
  const uint8_t* q = w.block(n, b, buf);
  const int64_t sb = w.scale_index(n, b);
  const __m512 vd = _mm512_set1_ps(_cvtsh_ss(w.d[sb]));
  __m512i lo, hi;
  if constexpr (F == Q8_0) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
    lo = _mm512_cvtepi8_epi32(_mm256_castsi256_si128(v));
    hi = _mm512_cvtepi8_epi32(_mm256_extracti128_si256(v, 1));
  } else {  // byte j of a block holds weight j (low nibble) and weight j + 16 (high)
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
    const __m128i low4 = _mm_set1_epi8(0x0F);
    lo = _mm512_cvtepu8_epi32(_mm_and_si128(v, low4));
    hi = _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(v, 4), low4));
    if constexpr (F == Q4_0) {
      lo = _mm512_sub_epi32(lo, _mm512_set1_epi32(8));
      hi = _mm512_sub_epi32(hi, _mm512_set1_epi32(8));
    }
  }
  lo_f = _mm512_mul_ps(vd, _mm512_cvtepi32_ps(lo));
  hi_f = _mm512_mul_ps(vd, _mm512_cvtepi32_ps(hi));
  if constexpr (F == Q4_1) {
    const __m512 vm = _mm512_set1_ps(_cvtsh_ss(w.m[sb]));
    lo_f = _mm512_add_ps(lo_f, vm);
    hi_f = _mm512_add_ps(hi_f, vm);
  }
}

// Transposes 16 rows of 16 32-bit elements in registers: r[i][j] <- r[j][i].
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {  // t[2i], t[2i+1]: elements 4L, 4L+1 / 4L+2, 4L+3 of rows 2i, 2i+1
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // r[4i + c], 128-bit lane L: column 4L + c of rows 4i..4i+3
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int c = 0; c < 4; ++c) {  // then a 4 x 4 transpose of 128-bit lanes per c
    const __m512i v0 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x44);
    const __m512i v1 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xEE);
    const __m512i v2 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x44);
    const __m512i v3 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xEE);
    t[c] = _mm512_shuffle_i32x4(v0, v2, 0x88);
    t[4 + c] = _mm512_shuffle_i32x4(v0, v2, 0xDD);
    t[8 + c] = _mm512_shuffle_i32x4(v1, v3, 0x88);
    t[12 + c] = _mm512_shuffle_i32x4(v1, v3, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// w = hi + lo, each bfloat16: hi rounded to nearest even, lo the rest rounded again (w to
// within 2^-16 relative; bfloat16 is float32's upper half).
inline void split(__m512 w, __m512& hi, __m512& lo) {
  const __m512i u = _mm512_castps_si512(w);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), odd);
  hi = _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  lo = _mm512_sub_ps(w, hi);
}

// The weight tiles of columns [n0, n0 + 32) (rows of the (N, K) weight; past N: zeros), for
// every 32-wide step s of K, as a high and a low bfloat16 part h:
// panel[((s * 2 + t) * 2 + h) * 256 + r * 16 + c] is the pair of part h of
// (w[n0 + 16 t + c, 32 s + 2 r], w[..., 32 s + 2 r + 1]), the layout in which the tile
// product reads its second operand.
template <Fmt F>
void pack_panel(const spark::PackedWeight& w, int64_t k_n, int64_t n0, uint32_t* panel) {
  const int64_t nb = k_n / QK, n_n = w.n_n;
  __m512i hi_rows[TILE], lo_rows[TILE];
  for (int64_t b = 0; b < nb; ++b) {
    for (int64_t t = 0; t < 2; ++t) {
      for (int64_t c = 0; c < TILE; ++c) {  // weight row n0 + 16 t + c as 16 pairs
        const int64_t n = n0 + t * TILE + c;
        hi_rows[c] = lo_rows[c] = _mm512_setzero_si512();
        if (n < n_n) {
          __m512 lo, hi, lo_h, lo_l, hi_h, hi_l;
          expand_block<F>(w, n, b, lo, hi);
          split(lo, lo_h, lo_l);
          split(hi, hi_h, hi_l);
          hi_rows[c] = to_pairs(lo_h, hi_h);
          lo_rows[c] = to_pairs(lo_l, hi_l);
        }
      }
      transpose16(hi_rows);
      transpose16(lo_rows);
      uint32_t* out = panel + (b * 2 + t) * 2 * TILE * TILE;
      for (int64_t r = 0; r < TILE; ++r) {
        _mm512_storeu_si512(out + r * TILE, hi_rows[r]);
        _mm512_storeu_si512(out + TILE * TILE + r * TILE, lo_rows[r]);
      }
    }
  }
}

// y[:, n0 : n0 + 32) from x's bf16 tiles (m_pad rows, a multiple of 32) and a packed panel.
void panel_product(const uint16_t* xt, int64_t m_n, int64_t m_pad, int64_t k_n,
                   const uint32_t* panel, float* y, int64_t n_n, int64_t n0) {
  const int64_t steps = k_n / QK;
  const bool full_cols = n0 + PANEL <= n_n;
  alignas(64) float part[MBLOCK * PANEL];
  for (int64_t m0 = 0; m0 < m_pad; m0 += MBLOCK) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    const uint16_t* xa = xt + (m0 / TILE) * steps * TILE * QK;  // rows m0 .. m0 + 15
    const uint16_t* xc = xa + steps * TILE * QK;                // rows m0 + 16 .. m0 + 31
    for (int64_t s = 0; s < steps; ++s) {
      const uint32_t* p = panel + s * 4 * TILE * TILE;  // hi, lo of columns a; then of b
      _tile_loadd(4, xa + s * TILE * QK, 64);
      _tile_loadd(5, xc + s * TILE * QK, 64);
      _tile_loadd(6, p, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(2, 5, 6);
      _tile_loadd(7, p + TILE * TILE, 64);
      _tile_dpbf16ps(0, 4, 7);
      _tile_dpbf16ps(2, 5, 7);
      _tile_loadd(6, p + 2 * TILE * TILE, 64);
      _tile_dpbf16ps(1, 4, 6);
      _tile_dpbf16ps(3, 5, 6);
      _tile_loadd(7, p + 3 * TILE * TILE, 64);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(3, 5, 7);
    }
    if (full_cols && m0 + MBLOCK <= m_n) {  // straight into y
      float* o = y + m0 * n_n + n0;
      const int64_t stride = n_n * 4;
      _tile_stored(0, o, stride);
      _tile_stored(1, o + TILE, stride);
      _tile_stored(2, o + TILE * n_n, stride);
      _tile_stored(3, o + TILE * n_n + TILE, stride);
    } else {  // the ragged edge: through a buffer, copying the rows and columns that exist
      _tile_stored(0, part, PANEL * 4);
      _tile_stored(1, part + TILE, PANEL * 4);
      _tile_stored(2, part + TILE * PANEL, PANEL * 4);
      _tile_stored(3, part + TILE * PANEL + TILE, PANEL * 4);
      const int64_t rows = std::min<int64_t>(MBLOCK, m_n - m0);
      const int64_t cols = std::min<int64_t>(PANEL, n_n - n0);
      for (int64_t r = 0; r < rows; ++r)
        std::memcpy(y + (m0 + r) * n_n + n0, part + r * PANEL, cols * sizeof(float));
    }
  }
}

// x (M, K) f32 -> bf16 tiles: xt[((i / 16) * steps + s) * 512 + (i % 16) * 32 + j] is
// x[i, 32 s + j] rounded to nearest even; rows past M are zero.
void round_rows(const float* x, int64_t m_n, int64_t m_pad, int64_t k_n, uint16_t* xt) {
  const int64_t steps = k_n / QK;
  for (int64_t i = 0; i < m_pad; ++i)
    for (int64_t s = 0; s < steps; ++s) {
      uint16_t* dst = xt + ((i / TILE) * steps + s) * TILE * QK + (i % TILE) * QK;
      if (i >= m_n) {
        std::memset(dst, 0, QK * sizeof(uint16_t));
        continue;
      }
      const float* src = x + i * k_n + s * QK;
      _mm512_storeu_si512(dst, to_pairs(_mm512_loadu_ps(src), _mm512_loadu_ps(src + 16)));
    }
}
#endif

using Weight = spark::PackedWeight;

ffi::Error QMatMul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::RemainingArgs args,
                   ffi::RemainingRets outs, int32_t fmt) {
  if (fmt < Q8_0 || fmt > Q4_1) return ffi::Error::InvalidArgument("qmatmul: unknown format");
  if (!amx_ready())
    return ffi::Error(ffi::ErrorCode::kUnimplemented, "qmatmul: AMX is not available here");
  const auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("qmatmul: expected x (M, K)");
  const int64_t m_n = xd[0], k_n = xd[1];
  if (k_n % QK != 0) return ffi::Error::InvalidArgument("qmatmul: K is not a multiple of 32");
  std::vector<Weight> ws;
  if (auto err = spark::packed_weights("qmatmul", args, outs, fmt == Q8_0, k_n, ws);
      !err.success())
    return err;
  const int64_t n_w = static_cast<int64_t>(ws.size());
  std::vector<int64_t> first(n_w + 1, 0);  // first[i]: weight i's first panel
  for (int64_t i = 0; i < n_w; ++i) first[i + 1] = first[i] + (ws[i].n_n + PANEL - 1) / PANEL;
  if (m_n == 0 || k_n == 0) {
    for (auto& w : ws) std::fill(w.y, w.y + m_n * w.n_n, 0.f);
    return ffi::Error::Success();
  }
#if SPARK_QMATMUL_AMX
  const int64_t m_pad = (m_n + MBLOCK - 1) / MBLOCK * MBLOCK;
  std::vector<uint16_t> xb(m_pad * k_n);
  round_rows(x.typed_data(), m_n, m_pad, k_n, xb.data());
  const int64_t units = first[n_w];
  const Fmt f = static_cast<Fmt>(fmt);
  spark::parallel_units(pool, units, pool.num_threads(), [&](int64_t u) {
    const int64_t i = std::upper_bound(first.begin(), first.end(), u) - first.begin() - 1;
    const Weight& w = ws[i];
    const int64_t n0 = (u - first[i]) * PANEL;
    thread_local std::vector<uint32_t> panel;
    panel.resize(k_n / QK * 4 * TILE * TILE);
    if (f == Q8_0) pack_panel<Q8_0>(w, k_n, n0, panel.data());
    else if (f == Q4_0) pack_panel<Q4_0>(w, k_n, n0, panel.data());
    else pack_panel<Q4_1>(w, k_n, n0, panel.data());
    configure_tiles();  // per thread, and cheap next to a panel's products
    panel_product(xb.data(), m_n, m_pad, k_n, panel.data(), w.y, w.n_n, n0);
    _tile_release();
  });
#endif
  return ffi::Error::Success();
}

}  // namespace

extern "C" int SparkAmxReady() { return amx_ready() ? 1 : 0; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparkQMatMul, QMatMul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x (M, K)
                                  .RemainingArgs()  // per weight: qs, d, m (packed_args.h)
                                  .RemainingRets()  // per weight: (M, N) f32
                                  .Attr<int32_t>("fmt"));  // 0 q8_0, 1 q4_0, 2 q4_1
