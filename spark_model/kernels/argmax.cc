// Greedy token choice on CPU (an XLA FFI handler): the index of each row's maximum logit.
//
// Why a kernel: XLA:CPU's reductions over a (B, V) array run close to one element per
// cycle; over 8 rows of an 8K vocabulary (256 KB) the max-then-first-index pair took about
// 100 us, a tenth of a decode step of 8 sequences. These two passes over each row take a few.
//
//   x   (B, V) f32
//   out (B,)   s32: the first index of the row's maximum; the first NaN if the row has one
//                   (what numpy.argmax and jnp.argmax return)
//
// Comparisons run on integer keys that order floats as their values do, so -ffast-math
// (which assumes there are no NaNs or infinities) cannot change the result, and the loops
// vectorise as integer max and compare.

#include <algorithm>
#include <climits>
#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t SPAN = 64;  // elements checked together before looking for the hit

inline bool is_nan(uint32_t b) { return (b & 0x7fffffffu) > 0x7f800000u; }

// A signed key with key(a) < key(b) iff a < b for non-NaN a, b, except that -0 (key -1)
// sorts below +0 (key 0).
inline int32_t order_key(uint32_t b) {
  return static_cast<int32_t>(b ^ (static_cast<uint32_t>(static_cast<int32_t>(b) >> 31) >> 1));
}

// The first index in [0, n) whose bits satisfy hit, or n: spans of SPAN checked at once.
template <class Hit>
int64_t first_index(const uint32_t* row, int64_t n, Hit hit) {
  for (int64_t s = 0; s < n; s += SPAN) {
    const int64_t e = std::min(s + SPAN, n);
    uint32_t any = 0;
    for (int64_t i = s; i < e; ++i) any |= hit(row[i]);
    if (any)
      for (int64_t i = s; i < e; ++i)
        if (hit(row[i])) return i;
  }
  return n;
}

int32_t row_argmax(const uint32_t* row, int64_t n) {
  int32_t top = INT32_MIN;
  uint32_t nan = 0;
  for (int64_t i = 0; i < n; ++i) {
    nan |= is_nan(row[i]);
    top = std::max(top, order_key(row[i]));  // NaNs pollute top, but then it is not used
  }
  if (nan) return static_cast<int32_t>(first_index(row, n, is_nan));
  if (top == 0 || top == -1)  // the maximum is a zero: -0 and +0 are equal
    return static_cast<int32_t>(first_index(row, n, [](uint32_t b) { return (b << 1) == 0; }));
  return static_cast<int32_t>(first_index(row, n, [top](uint32_t b) { return order_key(b) == top; }));
}

ffi::Error Argmax(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::S32> out) {
  const auto d = x.dimensions();
  if (d.size() != 2 || d[1] < 1 || out->dimensions().size() != 1 || out->dimensions()[0] != d[0])
    return ffi::Error::InvalidArgument("argmax: expected x (B, V) with V >= 1 and out (B,)");
  // Read as bits (the buffer's bytes; uint32_t and float have the same size and alignment).
  const uint32_t* p = reinterpret_cast<const uint32_t*>(x.typed_data());
  int32_t* o = out->typed_data();
  for (int64_t b = 0; b < d[0]; ++b) o[b] = row_argmax(p + b * d[1], d[1]);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparkArgmax, Argmax,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x (B, V)
                                  .Ret<ffi::Buffer<ffi::S32>>());  // (B,)
