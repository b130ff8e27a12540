// A block-quantized weight expanded to float32 (XLA FFI handler), for products with many rows.
//
// Why a kernel: a prefill chunk multiplies hundreds of rows by each weight, which a float32
// dot does at the machine's arithmetic rate, so a packed weight is expanded once and handed
// to XLA's dot. XLA's own expansion of the 4-bit formats (nibble unpacking, a concatenation
// and float16 conversions in one loop fusion) ran at about 0.1 G weights/s on SmolLM2's
// matrices, which made a q4_1 prefill slower than the float32 one; this one runs at memory
// speed, on all intra-op threads.
//
//   SparkDequantize: qs, d, m (d again unless q4_1; a layout of packed_args.h), after (any
//                    array, not read: it orders the expansion after the activations it
//                    serves; see kernels.dequantize), attr fmt
//                    -> w (N, K) f32, the values quant.dequantize gives: d q (q8_0),
//                    d (q - 8) (q4_0), d q + m (q4_1; the product and the sum rounded
//                    separately where the compiler keeps them apart, else fused: within
//                    one unit in the last place).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include <immintrin.h>

#include "packed_args.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t QK = 32;
constexpr int64_t SERIAL_BELOW = 64 * 1024;  // weights below which one thread runs
constexpr int64_t MIN_ROWS_PER_UNIT = 16;

enum Fmt : int32_t { Q8_0 = 0, Q4_0 = 1, Q4_1 = 2 };  // as in qmatvec.cc

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define SPARK_DEQUANT_AVX512 1
#else
#define SPARK_DEQUANT_AVX512 0
#endif

inline float half(uint16_t h) {  // IEEE binary16 -> float, exactly
#ifdef __F16C__
  return _cvtsh_ss(h);
#else
  const uint32_t sgn = (h & 0x8000u) << 16, e = (h >> 10) & 0x1F, mnt = h & 0x3FF;
  const float v = e == 0 ? std::ldexp(static_cast<float>(mnt), -24)
                : e == 31 ? (mnt ? NAN : INFINITY)
                          : std::ldexp(static_cast<float>(mnt | 0x400), static_cast<int>(e) - 25);
  return sgn ? -v : v;
#endif
}

// Rows [n0, n1) of the (N, K) output.
void expand(Fmt f, const spark::PackedWeight& w, float* out, int64_t k_n, int64_t n0,
            int64_t n1) {
  const int64_t nb = k_n / QK;
  uint8_t buf[QK];
  for (int64_t n = n0; n < n1; ++n) {
    float* o = out + n * k_n;
    for (int64_t b = 0; b < nb; ++b, o += QK) {
      const uint8_t* q = w.block(n, b, buf);
      const int64_t sb = w.scale_index(n, b);
      const float dv = half(w.d[sb]);
      const float mv = f == Q4_1 ? half(w.m[sb]) : 0.f;
#if SPARK_DEQUANT_AVX512
      const __m512 vd = _mm512_set1_ps(dv);
      __m512i lo, hi;  // the block's 32 quants as int32, in weight order
      if (f == Q8_0) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
        lo = _mm512_cvtepi8_epi32(_mm256_castsi256_si128(v));
        hi = _mm512_cvtepi8_epi32(_mm256_extracti128_si256(v, 1));
      } else {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
        const __m128i low4 = _mm_set1_epi8(0x0F);
        lo = _mm512_cvtepu8_epi32(_mm_and_si128(v, low4));
        hi = _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(v, 4), low4));
        if (f == Q4_0) {
          const __m512i eight = _mm512_set1_epi32(8);
          lo = _mm512_sub_epi32(lo, eight);
          hi = _mm512_sub_epi32(hi, eight);
        }
      }
      __m512 wl = _mm512_mul_ps(vd, _mm512_cvtepi32_ps(lo));
      __m512 wh = _mm512_mul_ps(vd, _mm512_cvtepi32_ps(hi));
      if (f == Q4_1) {
        const __m512 vm = _mm512_set1_ps(mv);
        wl = _mm512_add_ps(wl, vm);
        wh = _mm512_add_ps(wh, vm);
      }
      _mm512_storeu_ps(o, wl);
      _mm512_storeu_ps(o + 16, wh);
#else
      for (int64_t j = 0; j < QK; ++j) {
        int32_t v;
        if (f == Q8_0) {
          v = static_cast<int8_t>(q[j]);
        } else {
          const uint8_t byte = q[j & 15];
          v = (j < 16 ? byte & 0x0F : byte >> 4) - (f == Q4_0 ? 8 : 0);
        }
        o[j] = dv * static_cast<float>(v) + mv;
      }
#endif
    }
  }
}

ffi::Error Dequantize(ffi::ThreadPool pool, ffi::AnyBuffer qs, ffi::Buffer<ffi::F16> d,
                      ffi::Buffer<ffi::F16> mn, ffi::AnyBuffer /*after*/, int32_t fmt,
                      ffi::ResultBuffer<ffi::F32> out) {
  if (fmt < Q8_0 || fmt > Q4_1) return ffi::Error::InvalidArgument("dequantize: unknown format");
  const Fmt f = static_cast<Fmt>(fmt);
  spark::PackedWeight w;
  if (auto err = spark::packed_weight("dequantize", qs, d, mn, f == Q8_0, -1, w);
      !err.success())
    return err;
  const int64_t n_n = w.n_n, k_n = w.nb * QK;
  const auto od = out->dimensions();
  if (od.size() != 2 || od[0] != n_n || od[1] != k_n)
    return ffi::Error::InvalidArgument("dequantize: the output does not match the weight");
  if (n_n == 0 || k_n == 0) return ffi::Error::Success();
  int64_t units = 1;
  if (n_n * k_n >= SERIAL_BELOW)
    units = std::clamp<int64_t>(4 * pool.num_threads(), 1,
                                std::max<int64_t>(n_n / MIN_ROWS_PER_UNIT, 1));
  spark::parallel_units(pool, units, std::min<int64_t>(units, pool.num_threads()),
                        [&](int64_t u) {
    expand(f, w, out->typed_data(), k_n, n_n * u / units, n_n * (u + 1) / units);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparkDequantize, Dequantize,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()         // qs, d, m: a layout of
                                  .Arg<ffi::Buffer<ffi::F16>>()  // packed_args.h (m: d
                                  .Arg<ffi::Buffer<ffi::F16>>()  // again unless q4_1)
                                  .Arg<ffi::AnyBuffer>()         // after: not read
                                  .Attr<int32_t>("fmt")          // 0 q8_0, 1 q4_0, 2 q4_1
                                  .Ret<ffi::Buffer<ffi::F32>>());  // (N, K)
