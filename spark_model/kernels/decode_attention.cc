// Single-query attention over the KV cache, for the decode step on CPU (an XLA FFI handler).
//
// Why a kernel: expressed in XLA ops, each block of keys is first copied out of the cache
// by a dynamic slice (about 8 GB/s on one core here) and then scored by a small library dot,
// so a step at position 100K read its keys and values at about 6 GB/s. This kernel reads
// them where they lie, once, and splits the positions over XLA's own intra-op threads.
//
// Axis letters as in spark_model: B batch, R cache rows (>= B), K kv heads, G query heads per
// kv head, S cache positions, H head dim.
//
//   q    (B, K, G, H) f32, already scaled by 1/sqrt(H)
//   k, v (R, K, S, H) f32: the cache; row b < B belongs to query b
//   pos  (B,)        s32: query b attends to cache positions 0 .. pos[b]
//   out  (B, K, G, H) f32
//
// SparkDecodeAttentionRows takes one more argument, row (B,) s32: query b reads cache row
// row[b] instead of row b, so several queries may share a row (the T tokens a speculative
// verify step checks for one sequence, each at its own position). Every query is computed
// by the same code whatever the others are, so a query gives bitwise the same output here
// as in a one-query-per-row decode step.
//
// Work is cut into units of one (b, kv head, span of positions). Each unit computes a
// partial softmax (max m, sum l, weighted values acc) over its span; partials of the same
// (b, kv head) are then merged by rescaling, as in any split-K online softmax. A query's
// span length depends on its own position only (span_length): about 8 units per query,
// so that a short cache still feeds both threads, at most 1,024 positions each.
//
// SmolLM2's shape (3 query heads per kv head, head dim 64), 30 layers' attention of one
// query (/tmp timing loop over this kernel, 2 threads): 1.00 / 1.98 / 13.5 ms at positions
// 300 / 1,024 / 4,096 with fixed 1,024-position spans, no key prefetch and that shape not
// compiled in; 0.64 / 1.23 / 6.7 ms with all three (21 / 38 / 28 GB/s of K and V).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t CHUNK = 1024;         // most positions per unit of work
constexpr int64_t MIN_CHUNK = 64;
constexpr int64_t UNITS_PER_QUERY = 8;  // a query's (kv head, span) units aimed at
// Fewer (rows x positions x kv heads) than this run on one thread. Four layers' attention
// (2 cores): one row at 1,000 positions 0.15 -> 0.06 ms and eight rows at 400 positions
// 0.55 -> 0.29 ms against the earlier 8,192; below about 512 a second thread costs more
// than it saves.
constexpr int64_t SERIAL_BELOW = 512;
constexpr int64_t MAX_G = 16;           // query heads per kv head (scores live on the stack)

struct Partial {
  float m[MAX_G];
  float l[MAX_G];
};

// Asks for position j's values (into L2) while its key is scored, so that the weighted sum
// over the span's values finds them there. At position 100K (4 layers, 2 cores) this took
// the attention from 18.4 to 16.9 ms. Fetching the next span's keys the same way made it
// slower (23 ms): the hardware prefetcher already streams them.
inline void fetch_values(const float* vj, int64_t h_n) {
#ifdef __AVX512F__
  for (int64_t h = 0; h < h_n; h += 16)
    _mm_prefetch(reinterpret_cast<const char*>(vj + h), _MM_HINT_T1);
#endif
}

// Asks for the key KEYS_AHEAD positions on (into L1), which the hardware prefetcher alone
// did not keep up with: SmolLM2's decode step at position 4,096 took 15.6 ms without and
// 12.5-13.0 ms with it (16 to 64 keys ahead, into L1 or L2, all alike within the noise). A
// prefetch never faults, so running past the span or the cache is harmless.
constexpr int64_t KEYS_AHEAD = 32;
inline void fetch_key(const float* kj, int64_t h_n) {
#ifdef __AVX512F__
  for (int64_t h = 0; h < h_n; h += 16)
    _mm_prefetch(reinterpret_cast<const char*>(kj + h), _MM_HINT_T0);
#endif
}

// One unit: positions [s0, s1) of one kv head. Writes m, l and acc (G x H). G_ and H_ are
// the query heads per kv head and the head dim when known at compile time (0: runtime), so
// the common shapes get fully unrolled loops with acc held in registers.
template <int64_t G_, int64_t H_>
void attend_span(const float* __restrict q, const float* __restrict k,
                 const float* __restrict v, int64_t g_rt, int64_t h_rt, int64_t s0, int64_t s1,
                 Partial& part, float* __restrict acc_out) {
  const int64_t g_n = G_ ? G_ : g_rt;
  const int64_t h_n = H_ ? H_ : h_rt;
  float scores[MAX_G][CHUNK];  // (G, span): contiguous per query head, so exp vectorises
  const int64_t n = s1 - s0;
  for (int64_t j = 0; j < n; ++j) {
    const float* __restrict kj = k + (s0 + j) * h_n;
    fetch_values(v + (s0 + j) * h_n, h_n);
    fetch_key(kj + KEYS_AHEAD * h_n, h_n);
    for (int64_t g = 0; g < g_n; ++g) {
      const float* __restrict qg = q + g * h_n;
      float s = 0.f;
      for (int64_t h = 0; h < h_n; ++h) s += qg[h] * kj[h];
      scores[g][j] = s;
    }
  }
  for (int64_t g = 0; g < g_n; ++g) {
    float* sg = scores[g];
    float m = sg[0];
    for (int64_t j = 1; j < n; ++j) m = std::max(m, sg[j]);
    float l = 0.f;
    for (int64_t j = 0; j < n; ++j) {
      sg[j] = std::exp(sg[j] - m);
      l += sg[j];
    }
    part.m[g] = m;
    part.l[g] = l;
  }
  float acc[(G_ && H_) ? G_ * H_ : 1];
  float* __restrict a = (G_ && H_) ? acc : acc_out;
  std::fill(a, a + g_n * h_n, 0.f);
  for (int64_t j = 0; j < n; ++j) {
    const float* __restrict vj = v + (s0 + j) * h_n;
    for (int64_t g = 0; g < g_n; ++g) {
      const float p = scores[g][j];
      for (int64_t h = 0; h < h_n; ++h) a[g * h_n + h] += p * vj[h];
    }
  }
  if (G_ && H_) std::copy(a, a + g_n * h_n, acc_out);
}

using SpanFn = void (*)(const float*, const float*, const float*, int64_t, int64_t, int64_t,
                        int64_t, Partial&, float*);

SpanFn pick_span(int64_t g_n, int64_t h_n) {
#define SPARK_SPAN(G, H) \
  if (g_n == G && h_n == H) return attend_span<G, H>;
  SPARK_SPAN(1, 64) SPARK_SPAN(2, 64) SPARK_SPAN(3, 64) SPARK_SPAN(4, 64)
  SPARK_SPAN(5, 64) SPARK_SPAN(6, 64) SPARK_SPAN(7, 64) SPARK_SPAN(8, 64)
  SPARK_SPAN(1, 128) SPARK_SPAN(2, 128) SPARK_SPAN(3, 128) SPARK_SPAN(4, 128)
  SPARK_SPAN(5, 128) SPARK_SPAN(6, 128) SPARK_SPAN(7, 128) SPARK_SPAN(8, 128)
#undef SPARK_SPAN
  return attend_span<0, 0>;
}

// Positions per unit for a query that sees n keys in each of k_n kv heads: about
// UNITS_PER_QUERY units in all, so that a short cache still feeds every thread, in whole
// cache lines' worth of positions, at most CHUNK. A function of the query's own position
// only, so that the query's result does not depend on the other queries of the call.
int64_t span_length(int64_t n, int64_t k_n) {
  const int64_t want = (n * k_n + UNITS_PER_QUERY - 1) / UNITS_PER_QUERY;
  return std::clamp<int64_t>((want + MIN_CHUNK - 1) / MIN_CHUNK * MIN_CHUNK, MIN_CHUNK, CHUNK);
}

// row_b: the cache row of each query, or null for row b.
ffi::Error Attend(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k,
                  ffi::Buffer<ffi::F32>& v, ffi::Buffer<ffi::S32>& pos, const int32_t* row_b,
                  ffi::ResultBuffer<ffi::F32>& out) {
  const auto qd = q.dimensions();
  const auto kd = k.dimensions();
  const auto vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || pos.dimensions().size() != 1 ||
      !std::equal(kd.begin(), kd.end(), vd.begin()))
    return ffi::Error::InvalidArgument(
        "decode_attention: expected q (B,K,G,H), k and v (R,K,S,H), pos (B,)");
  const int64_t b_n = qd[0], k_n = qd[1], g_n = qd[2], h_n = qd[3];
  const int64_t r_n = kd[0], s_n = kd[2];
  if (kd[1] != k_n || kd[3] != h_n || (!row_b && r_n < b_n) || pos.dimensions()[0] != b_n)
    return ffi::Error::InvalidArgument("decode_attention: q, cache and pos shapes disagree");
  if (g_n > MAX_G) return ffi::Error::InvalidArgument("decode_attention: too many query heads per kv head");
  if (row_b)
    for (int64_t b = 0; b < b_n; ++b)
      if (row_b[b] < 0 || row_b[b] >= r_n)
        return ffi::Error::InvalidArgument("decode_attention: a query's cache row is out of range");

  const int32_t* pos_b = pos.typed_data();
  // Units: (b, kh, chunk) for every chunk up to each row's own position.
  std::vector<int64_t> first_unit(b_n * k_n + 1, 0);  // prefix sums over (b, kh)
  std::vector<int64_t> n_keys(b_n), chunk(b_n);
  int64_t total_keys = 0;
  for (int64_t b = 0; b < b_n; ++b) {
    n_keys[b] = std::clamp<int64_t>(int64_t{pos_b[b]} + 1, 0, s_n);
    chunk[b] = span_length(n_keys[b], k_n);
    total_keys += n_keys[b] * k_n;
    for (int64_t kh = 0; kh < k_n; ++kh)
      first_unit[b * k_n + kh + 1] =
          first_unit[b * k_n + kh] + (n_keys[b] + chunk[b] - 1) / chunk[b];
  }
  const int64_t n_units = first_unit[b_n * k_n];
  std::vector<Partial> parts(n_units);
  std::vector<float> accs(n_units * g_n * h_n);

  const float* q_p = q.typed_data();
  const float* k_p = k.typed_data();
  const float* v_p = v.typed_data();
  const SpanFn span = pick_span(g_n, h_n);
  auto run_unit = [&](int64_t u) {
    // The (b, kh) that unit u belongs to.
    int64_t bk = static_cast<int64_t>(
        std::upper_bound(first_unit.begin(), first_unit.end(), u) - first_unit.begin()) - 1;
    const int64_t b = bk / k_n, kh = bk % k_n;
    const int64_t s0 = (u - first_unit[bk]) * chunk[b];
    const int64_t s1 = std::min(s0 + chunk[b], n_keys[b]);
    const int64_t r = row_b ? row_b[b] : b;
    const int64_t cache_off = ((r * k_n) + kh) * s_n * h_n;  // row r < R of (R, K, S, H)
    span(q_p + bk * g_n * h_n, k_p + cache_off, v_p + cache_off, g_n, h_n, s0, s1,
                parts[u], accs.data() + u * g_n * h_n);
  };

  const int64_t workers = total_keys < SERIAL_BELOW ? 1 : pool.num_threads();
  spark::parallel_units(pool, n_units, workers, run_unit);

  // Merge the partials of each (b, kh) and normalise.
  float* o_p = out->typed_data();
  for (int64_t bk = 0; bk < b_n * k_n; ++bk) {
    float* o = o_p + bk * g_n * h_n;
    std::fill(o, o + g_n * h_n, 0.f);
    for (int64_t g = 0; g < g_n; ++g) {
      if (first_unit[bk] == first_unit[bk + 1]) continue;  // no positions: zeros
      float m = parts[first_unit[bk]].m[g];
      for (int64_t u = first_unit[bk]; u < first_unit[bk + 1]; ++u) m = std::max(m, parts[u].m[g]);
      float l = 0.f;
      for (int64_t u = first_unit[bk]; u < first_unit[bk + 1]; ++u) {
        const float w = std::exp(parts[u].m[g] - m);
        l += w * parts[u].l[g];
        const float* a = accs.data() + (u * g_n + g) * h_n;
        for (int64_t h = 0; h < h_n; ++h) o[g * h_n + h] += w * a[h];
      }
      for (int64_t h = 0; h < h_n; ++h) o[g * h_n + h] /= l;
    }
  }
  return ffi::Error::Success();
}

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                           ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                           ffi::Buffer<ffi::S32> pos, ffi::ResultBuffer<ffi::F32> out) {
  return Attend(pool, q, k, v, pos, nullptr, out);
}

ffi::Error DecodeAttentionRows(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                               ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                               ffi::Buffer<ffi::S32> pos, ffi::Buffer<ffi::S32> row,
                               ffi::ResultBuffer<ffi::F32> out) {
  if (row.dimensions().size() != 1 || row.dimensions()[0] != pos.dimensions()[0])
    return ffi::Error::InvalidArgument("decode_attention: row must be (B,) like pos");
  return Attend(pool, q, k, v, pos, row.typed_data(), out);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparkDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k cache
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v cache
                                  .Arg<ffi::Buffer<ffi::S32>>()   // pos
                                  .Ret<ffi::Buffer<ffi::F32>>());  // out

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparkDecodeAttentionRows, DecodeAttentionRows,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k cache
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v cache
                                  .Arg<ffi::Buffer<ffi::S32>>()   // pos
                                  .Arg<ffi::Buffer<ffi::S32>>()   // row
                                  .Ret<ffi::Buffer<ffi::F32>>());  // out
