// The packed weights of a product call (qmatvec.cc, qmatmul.cc): per weight its quants qs
// (N, K) s8 or (N, K/2) u8, scales d and minimums m (N, K/32) f16 (d again unless q4_1), and
// one (M, N) f32 output, checked against x's K.

#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace spark {

struct PackedWeight {
  const uint8_t* qs;
  const uint16_t* d;
  const uint16_t* m;
  float* y;
  int64_t n_n;
};

// Fills `ws` from the call's remaining arguments and results; `who` names the kernel in
// the errors. `q8`: the format has one byte per weight (q8_0), else half a byte.
inline xla::ffi::Error packed_weights(const char* who, xla::ffi::RemainingArgs& args,
                                      xla::ffi::RemainingRets& outs, bool q8, int64_t k_n,
                                      std::vector<PackedWeight>& ws) {
  namespace ffi = xla::ffi;
  const std::string name(who);
  const int64_t n_w = static_cast<int64_t>(outs.size());
  if (n_w == 0 || static_cast<int64_t>(args.size()) != 3 * n_w)
    return ffi::Error::InvalidArgument(name + ": expected qs, d, m and one output per weight");
  ws.resize(n_w);
  for (int64_t i = 0; i < n_w; ++i) {
    auto qs = args.get<ffi::AnyBuffer>(3 * i);
    auto d = args.get<ffi::Buffer<ffi::F16>>(3 * i + 1);
    auto mn = args.get<ffi::Buffer<ffi::F16>>(3 * i + 2);
    auto y = outs.get<ffi::Buffer<ffi::F32>>(i);
    if (qs.has_error()) return qs.error();
    if (d.has_error()) return d.error();
    if (mn.has_error()) return mn.error();
    if (y.has_error()) return y.error();
    const auto qd = qs->dimensions(), dd = d->dimensions(), md = mn->dimensions();
    if (qd.size() != 2 || dd.size() != 2 || md.size() != 2)
      return ffi::Error::InvalidArgument(name + ": expected qs, d and m 2-D");
    const int64_t n_n = qd[0];
    if (qd[1] != (q8 ? k_n : k_n / 2) || dd[0] != n_n || dd[1] != k_n / 32 || md[0] != n_n ||
        md[1] != k_n / 32)
      return ffi::Error::InvalidArgument(name + ": packed weight does not match x's K");
    ws[i] = {static_cast<const uint8_t*>(qs->untyped_data()), d->typed_data(),
             mn->typed_data(), (*y)->typed_data(), n_n};
  }
  return ffi::Error::Success();
}

}  // namespace spark
