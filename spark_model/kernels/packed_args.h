// The packed weights of a product call (qmatvec.cc, qmatmul.cc, dequant.cc), parsed and
// checked once, in either of the two layouts of spark_model/quant.py:
//
//   rows          qs (N, K) s8 or (N, K/2) u8, each row's blocks in GGUF order;
//                 d, m (N, K/32) f16
//   interleaved   rows in groups of 16: qs (N/16, K/32, C, 16, 4), chunk t of (group g,
//                 block b) holding bytes 4t .. 4t+3 of the block of each of the group's 16
//                 rows (C = 8 chunks of a 32-byte q8_0 block, 4 of a 16-byte 4-bit one);
//                 d, m (N/16, K/32, 16) f16
//
// m is d again for the formats without a minimum.

#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace spark {

constexpr int64_t GROUP = 16;  // rows per group of the interleaved layout

struct PackedWeight {
  const uint8_t* qs;
  const uint16_t* d;
  const uint16_t* m;
  float* y;  // the (M, N) output of a product call (unused elsewhere)
  int64_t n_n;
  int64_t nb;        // blocks per row (K / 32)
  bool interleaved;  // the grouped layout above
  bool q8;           // one byte per weight (q8_0), else half a byte

  int64_t block_bytes() const { return q8 ? 32 : 16; }
  int64_t chunks() const { return block_bytes() / 4; }

  // Quant bytes of row n's block b in GGUF order (block_bytes() of them): a pointer into
  // the weight, or for the interleaved layout into `buf`, where they are gathered.
  const uint8_t* block(int64_t n, int64_t b, uint8_t* buf) const {
    if (!interleaved) return qs + (n * nb + b) * block_bytes();
    const int64_t g = n / GROUP, j = n % GROUP;
    const uint8_t* p = qs + (g * nb + b) * chunks() * 64 + j * 4;
    for (int64_t t = 0; t < chunks(); ++t) std::memcpy(buf + 4 * t, p + t * 64, 4);
    return buf;
  }
  // Index of row n's block b in d and m.
  int64_t scale_index(int64_t n, int64_t b) const {
    return interleaved ? ((n / GROUP) * nb + b) * GROUP + n % GROUP : n * nb + b;
  }
};

// One weight from its three buffers; `who` names the kernel in the errors. k_n: the K the
// weight must have, or -1 to take it from the buffers.
inline xla::ffi::Error packed_weight(const std::string& who, const xla::ffi::AnyBuffer& qs,
                                     const xla::ffi::Buffer<xla::ffi::F16>& d,
                                     const xla::ffi::Buffer<xla::ffi::F16>& mn, bool q8,
                                     int64_t k_n, PackedWeight& w) {
  namespace ffi = xla::ffi;
  const auto qd = qs.dimensions(), dd = d.dimensions(), md = mn.dimensions();
  const bool inter = qd.size() == 5;
  bool ok;
  if (inter) {
    ok = dd.size() == 3 && md.size() == 3 && dd[2] == GROUP && qd[0] == dd[0] &&
         qd[1] == dd[1] && qd[2] == (q8 ? 8 : 4) && qd[3] == GROUP && qd[4] == 4;
  } else {
    ok = qd.size() == 2 && dd.size() == 2 && md.size() == 2 && qd[0] == dd[0] &&
         qd[1] == dd[1] * (q8 ? 32 : 16);
  }
  ok = ok && md.size() == dd.size();
  for (size_t i = 0; ok && i < dd.size(); ++i) ok = md[i] == dd[i];
  if (!ok)
    return ffi::Error::InvalidArgument(who + ": the quants, scales and minimums of a packed "
                                       "weight do not match");
  const int64_t nb = dd[1];
  if (k_n >= 0 && nb * 32 != k_n)
    return ffi::Error::InvalidArgument(who + ": packed weight does not match x's K");
  w = {static_cast<const uint8_t*>(qs.untyped_data()), d.typed_data(), mn.typed_data(),
       nullptr, inter ? dd[0] * GROUP : dd[0], nb, inter, q8};
  return ffi::Error::Success();
}

// Fills `ws` from a product call's remaining arguments (qs, d, m per weight) and results
// (one (M, N) f32 output each).
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
    if (auto err = packed_weight(name, *qs, *d, *mn, q8, k_n, ws[i]); !err.success())
      return err;
    const auto yd = (*y)->dimensions();
    if (yd.size() != 2 || yd[1] != ws[i].n_n)
      return ffi::Error::InvalidArgument(name + ": an output does not match its weight");
    ws[i].y = (*y)->typed_data();
  }
  return ffi::Error::Success();
}

}  // namespace spark
