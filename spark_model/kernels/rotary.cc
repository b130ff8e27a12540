// Sine and cosine of rotary angles on CPU (an XLA FFI handler): spark_model/rotary.py's
// method, computed once per call into arrays of their own.
//
// Why a kernel: the same arithmetic in XLA ops is cheap, but XLA fuses it into its
// consumers (the query rearranged for the attention kernel, the key written into the
// cache), and there it is recomputed for every element of every head. An XLA
// optimization barrier does not stop that (XLA:CPU drops it before fusion); a custom call
// does.
//
//   pos   (N,)     s32: positions in [0, 2^24)
//   limbs (4, P)   u32: each frequency's fraction of a turn, 16 bits per row (rotary.py)
//   sin, cos (N, P) f32
//
// Same integer steps and the same polynomials, in the same order, as rotary.py's XLA ops
// (built without -ffast-math); the two agree within 6e-8 (XLA may fuse a multiply and an
// add that this file rounds separately).

#include <cstdint>
#include <cstring>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr float TWO_PI_OVER_2_32 = static_cast<float>(6.283185307179586 / 4294967296.0);
constexpr float S0 = -1.6666654611e-1f, S1 = 8.3321608736e-3f, S2 = -1.9515295891e-4f;
constexpr float C0 = 4.166664568298827e-2f, C1 = -1.388731625493765e-3f,
                C2 = 2.443315711809948e-5f;

inline uint32_t shifted(uint32_t x, int e) {
  if (e >= 32 || e <= -32) return 0;
  return e >= 0 ? x << e : x >> -e;
}

ffi::Error Rotary(ffi::Buffer<ffi::S32> pos, ffi::Buffer<ffi::U32> limbs,
                  ffi::ResultBuffer<ffi::F32> sin_out, ffi::ResultBuffer<ffi::F32> cos_out) {
  const auto ld = limbs.dimensions();
  if (pos.dimensions().size() != 1 || ld.size() != 2 || ld[0] != 4)
    return ffi::Error::InvalidArgument("rotary: expected pos (N,) and limbs (4, P)");
  const int64_t n_n = pos.dimensions()[0], p_n = ld[1];
  const int32_t* p = pos.typed_data();
  const uint32_t* c = limbs.typed_data();
  float* so = sin_out->typed_data();
  float* co = cos_out->typed_data();
  for (int64_t n = 0; n < n_n; ++n) {
    const uint32_t q = static_cast<uint32_t>(p[n]);
    const uint32_t halves[2] = {q >> 12, q & 0xFFFu};
    const int scales[2] = {12, 0};
    for (int64_t j = 0; j < p_n; ++j) {
      uint32_t u = 0;
      for (int i = 0; i < 4; ++i)
        for (int h = 0; h < 2; ++h)
          u += shifted(halves[h] * c[i * p_n + j], 32 - 16 * (i + 1) + scales[h]);
      const uint32_t quarter = (u + (1u << 29)) >> 30;
      const int32_t rest = static_cast<int32_t>(u - (quarter << 30));
      const float x = static_cast<float>(rest) * TWO_PI_OVER_2_32;
      const float x2 = x * x;
      const float s = x + x * x2 * (S0 + x2 * (S1 + x2 * S2));
      const float k = 1.0f - 0.5f * x2 + x2 * x2 * (C0 + x2 * (C1 + x2 * C2));
      const uint32_t r = quarter & 3u;
      so[n * p_n + j] = r == 0 ? s : r == 1 ? k : r == 2 ? -s : -k;
      co[n * p_n + j] = r == 0 ? k : r == 1 ? -s : r == 2 ? -k : s;
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparkRotary, Rotary,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S32>>()   // positions (N,)
                                  .Arg<ffi::Buffer<ffi::U32>>()   // limbs (4, P)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // sin (N, P)
                                  .Ret<ffi::Buffer<ffi::F32>>());  // cos (N, P)
