// Row-invariant attention on the CPU: every query row is computed by the same fixed sequence of float32
// operations over its own visible keys, so its output does not depend on the other rows of the call (how many
// there are, which keys they see, how the work is split between threads).
//
// Written with 16-lane vector types (GCC/Clang vector extensions: AVX-512 registers where the machine has them,
// pairs of AVX2 registers or scalar code elsewhere) and built with -ffp-contract=off and without -ffast-math:
// every operation is one IEEE operation (the fused multiply-adds are explicit, correctly rounded on every
// machine) in a fixed order; the compiler neither fuses nor reassociates anything.
//   scores  s_j = (q . k_j as 16 lane-wise fma chains over the head dimension, lanes added by a fixed tree) * scale
//   softmax e_j = exp(s_j - max s); their sum in 16 lanes over the keys padded with -inf to a multiple of 16
//           (exp gives exactly 0 there, and x + 0 == x), lanes added by the same tree
//   output  o = (fma chain over the keys in the row's order of e_j v_j) / sum e
#include <torch/extension.h>
#include <ATen/Parallel.h>

#if defined(__AVX512F__) || defined(__FMA__)
#include <immintrin.h>
#endif

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "lanes.h"

namespace {

using leapdecode::i16;
using leapdecode::kLanes;
using leapdecode::lane_sum;
using leapdecode::load;
using leapdecode::splat;
using leapdecode::store;
using leapdecode::v16;
using leapdecode::v16u;

// the first `count` floats (all 16 when count >= 16), the rest zero
inline v16 load(const float* p, int64_t count) {
  if (count >= kLanes) return load(p);
  v16 x = {0};
  std::memcpy(&x, p, sizeof(float) * count);
  return x;
}

inline void store(float* p, v16 x, int64_t count) {
  if (count >= kLanes) return store(p, x);
  std::memcpy(p, &x, sizeof(float) * count);
}

// a * b + c, rounded once (the same bits whichever branch the machine takes)
inline v16 fma(v16 a, v16 b, v16 c) {
#if defined(__AVX512F__)
  return (v16)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__FMA__)
  typedef float v8 __attribute__((vector_size(32)));
  v8 lo = (v8)_mm256_fmadd_ps(_mm256_loadu_ps((const float*)&a), _mm256_loadu_ps((const float*)&b),
                               _mm256_loadu_ps((const float*)&c));
  v8 hi = (v8)_mm256_fmadd_ps(_mm256_loadu_ps((const float*)&a + 8), _mm256_loadu_ps((const float*)&b + 8),
                               _mm256_loadu_ps((const float*)&c + 8));
  v16 r;
  std::memcpy(&r, &lo, 32);
  std::memcpy((float*)&r + 8, &hi, 32);
  return r;
#else
  v16 r;
  for (int l = 0; l < kLanes; ++l) r[l] = std::fma(a[l], b[l], c[l]);
  return r;
#endif
}

// Lane l of the result: lane_sum(a[l]), added in exactly lane_sum's order (pairs of vectors are interleaved at
// each level so that one add serves two, four, eight, then sixteen of them).
inline v16 lane_sums(v16* a) {
  for (int l = 0; l < 8; ++l)
    a[l] = __builtin_shuffle(a[2 * l], a[2 * l + 1], i16{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23}) +
           __builtin_shuffle(a[2 * l], a[2 * l + 1], i16{8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31});
  for (int l = 0; l < 4; ++l)
    a[l] = __builtin_shuffle(a[2 * l], a[2 * l + 1], i16{0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27}) +
           __builtin_shuffle(a[2 * l], a[2 * l + 1], i16{4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31});
  for (int l = 0; l < 2; ++l)
    a[l] = __builtin_shuffle(a[2 * l], a[2 * l + 1], i16{0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29}) +
           __builtin_shuffle(a[2 * l], a[2 * l + 1], i16{2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31});
  return __builtin_shuffle(a[0], a[1], i16{0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30}) +
         __builtin_shuffle(a[0], a[1], i16{1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31});
}

// exp(x) for x <= 0 (scores minus their maximum); 0 below -87
inline v16 exp_nonpositive(v16 x) {
  const v16 lo = splat(-87.0f);
  return x < lo ? v16{} : leapdecode::exp_lanes(x);
}

struct Strides {
  int64_t batch, head, seq;  // in floats; the last dimension is contiguous
};

Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

constexpr int64_t kMaxChunks = 16;  // head dimensions up to 256

// What one call sees: tensors, their strides, and every row's key list.
struct Call {
  const float *q, *k, *v;
  Strides qs, ks, vs;
  int64_t queries, heads, kv_heads, group, dim, vdim;
  const int64_t *start, *stop, *col_ptr, *cols;  // col_ptr/cols null for ranges
  float scale;
  float* out;

  int64_t count(int64_t row) const { return col_ptr ? col_ptr[row + 1] - col_ptr[row] : stop[row] - start[row]; }
  int64_t key(int64_t row, int64_t j) const { return col_ptr ? cols[col_ptr[row] + j] : start[row] + j; }
  // how many of the row's first keys are 0, 1, 2, ... (the cache before this pass, for chains and trees)
  int64_t prefix(int64_t row) const {
    if (!col_ptr) return start[row] == 0 ? count(row) : 0;
    const int64_t n = count(row), *c = cols + col_ptr[row];
    int64_t j = 0;
    while (j < n && c[j] == j) ++j;
    return j;
  }
};

struct Query {
  const float* q;  // its vector (dim)
  float* scores;   // over its row's keys, padded with -inf to a multiple of 16; then the softmax numerators
  float* dst;      // its output (vdim)
  int64_t row, n;
  float total;
};

// A score is q . k as 16 partial sums, partial m an fma chain (from 0) over d = m, m + 16, m + 32, ... (the head
// dimension padded with zeros to a multiple of 16), the partials added in lane_sum's tree, times scale. Two
// routines compute exactly that: one key at a time (few queries), or sixteen keys transposed (many queries).

constexpr int64_t kTransposeFrom = 8;  // queries sharing the keys from which transposing them pays

// Few queries: each key's chunks loaded once, one 16-lane partial vector per (query, key), reduced 16 keys at a
// time by lane_sums. Keys key_of(0 .. count-1), count <= 16, scores stored at scores[at ..]. Queries' vectors
// are padded with zeros to DC chunks (DC: known at compile time, or 0 for the run-time count; same results).
template <int64_t DC, typename KeyOf>
inline void score_keys(const Call& c, const float* kbase, int64_t count, KeyOf key_of, Query* qs, int64_t nq,
                       int64_t at, const float* zeros) {
  const int64_t dc = DC ? DC : (c.dim + kLanes - 1) / kLanes;
  constexpr int64_t kMaxQueries = kTransposeFrom - 1;
  v16 dots[kMaxQueries][kLanes];
  for (int64_t l = 0; l < kLanes; ++l) {
    const float* k = l < count ? kbase + key_of(l) * c.ks.seq : zeros;
    v16 kv[DC ? DC : kMaxChunks];
    for (int64_t ch = 0; ch < dc; ++ch) kv[ch] = load(k + ch * kLanes, c.dim - ch * kLanes);
    for (int64_t i = 0; i < nq; ++i) {  // the queries' chains are independent: they run side by side
      v16 a = {0};
      for (int64_t ch = 0; ch < dc; ++ch) a = fma(load(qs[i].q + ch * kLanes), kv[ch], a);
      dots[i][l] = a;
    }
  }
  for (int64_t i = 0; i < nq; ++i) store(qs[i].scores + at, lane_sums(dots[i]) * c.scale, count);
}

// Many queries: the keys transposed into tile (d, lane) once (lanes from count on, and d from dim on, zero), then
// per query 16 partial vectors (lanes = keys), partial m over d = m, m + 16, ..., added in lane_sum's tree.
template <int64_t DC, typename KeyOf>
inline void score_transposed(const Call& c, const float* kbase, int64_t count, KeyOf key_of, Query* qs,
                             int64_t nq, int64_t at, float* tile) {
  const int64_t dc = DC ? DC : (c.dim + kLanes - 1) / kLanes, padded = dc * kLanes;
  for (int64_t l = 0; l < kLanes; ++l) {
    const float* k = l < count ? kbase + key_of(l) * c.ks.seq : nullptr;
    for (int64_t d = 0; d < padded; ++d) tile[d * kLanes + l] = k && d < c.dim ? k[d] : 0.0f;
  }
  for (int64_t i = 0; i < nq; ++i) {
    const float* q = qs[i].q;
    v16 part[kLanes] = {};
    for (int64_t ch = 0; ch < dc; ++ch)
      for (int64_t m = 0; m < kLanes; ++m)
        part[m] = fma(splat(q[ch * kLanes + m]), load(tile + (ch * kLanes + m) * kLanes), part[m]);
    for (int64_t w = kLanes / 2; w > 0; w /= 2)  // lane_sum's tree, lane-wise over the partials
      for (int64_t m = 0; m < w; ++m) part[m] = part[m] + part[m + w];
    store(qs[i].scores + at, part[0] * c.scale, count);
  }
}

template <int64_t DC, typename KeyOf>
inline void score(const Call& c, const float* kbase, int64_t count, KeyOf key_of, Query* qs, int64_t nq,
                  int64_t at, float* tile, const float* zeros) {
  if (nq >= kTransposeFrom) score_transposed<DC>(c, kbase, count, key_of, qs, nq, at, tile);
  else score_keys<DC>(c, kbase, count, key_of, qs, nq, at, zeros);
}

// Softmax numerators e_j = exp(s_j - max) in place, their sum in 16 lanes (padding adds exact zeros).
inline void softmax(Query& qq) {
  float* s = qq.scores;
  const int64_t padded = (qq.n + kLanes - 1) / kLanes * kLanes;
  v16 top = load(s);  // the maximum is exact in any order (the padding is -inf)
  for (int64_t j0 = kLanes; j0 < padded; j0 += kLanes) {
    const v16 x = load(s + j0);
    top = x > top ? x : top;
  }
  float m = top[0];
  for (int l = 1; l < kLanes; ++l) m = top[l] > m ? top[l] : m;
  const v16 mv = splat(m);
  v16 sum = {0};
  for (int64_t j0 = 0; j0 < padded; j0 += kLanes) {
    const v16 e = exp_nonpositive(load(s + j0) - mv);
    store(s + j0, e);
    sum = sum + e;
  }
  qq.total = lane_sum(sum);
}

// Outputs: per query, an fma chain over its keys in order of e_j * v_j, divided by the sum. The shared prefix
// [0, prefix) is walked once for a batch of queries (each value row read once per batch), then each query's
// remaining keys. VC: vdim / 16 known at compile time, or 0 (any vdim, at run time); same results.
template <int64_t VC>
void weigh_values(const Call& c, const float* vbase, Query* qs, int64_t nq, int64_t prefix, const float* zeros) {
  if constexpr (VC == 0) {
    const int64_t vc = (c.vdim + kLanes - 1) / kLanes;
    for (int64_t i = 0; i < nq; ++i) {
      const Query& qq = qs[i];
      v16 acc[kMaxChunks] = {};
      for (int64_t j = 0; j < qq.n; ++j) {
        const float* v = vbase + (j < prefix ? j : c.key(qq.row, j)) * c.vs.seq;
        const v16 p = splat(qq.scores[j]);
        for (int64_t ch = 0; ch < vc; ++ch) acc[ch] = fma(p, load(v + ch * kLanes, c.vdim - ch * kLanes), acc[ch]);
      }
      const v16 total = splat(qq.total);
      for (int64_t ch = 0; ch < vc; ++ch) store(qq.dst + ch * kLanes, acc[ch] / total, c.vdim - ch * kLanes);
    }
  } else {
    constexpr int64_t kBatch = 24 / VC > 0 ? 24 / VC : 1;  // accumulators that stay in registers
    for (int64_t q0 = 0; q0 < nq; q0 += kBatch) {
      const int64_t m = nq - q0 < kBatch ? nq - q0 : kBatch;
      const float* p[kBatch];
      for (int64_t i = 0; i < kBatch; ++i) p[i] = i < m ? qs[q0 + i].scores : zeros;  // zeros: unused slots
      v16 acc[kBatch][VC] = {};
      for (int64_t j = 0; j < prefix; ++j) {
        const float* v = vbase + j * c.vs.seq;
        v16 vv[VC];
        for (int64_t ch = 0; ch < VC; ++ch) vv[ch] = load(v + ch * kLanes);
        for (int64_t i = 0; i < kBatch; ++i) {
          const v16 pv = splat(p[i][j]);
          for (int64_t ch = 0; ch < VC; ++ch) acc[i][ch] = fma(pv, vv[ch], acc[i][ch]);
        }
      }
      for (int64_t i = 0; i < kBatch; ++i) {
        if (i >= m) break;
        const Query& qq = qs[q0 + i];
        v16 own[VC];
        for (int64_t ch = 0; ch < VC; ++ch) own[ch] = acc[i][ch];
        for (int64_t j = prefix; j < qq.n; ++j) {
          const float* v = vbase + c.key(qq.row, j) * c.vs.seq;
          const v16 pv = splat(qq.scores[j]);
          for (int64_t ch = 0; ch < VC; ++ch) own[ch] = fma(pv, load(v + ch * kLanes), own[ch]);
        }
        const v16 total = splat(qq.total);
        for (int64_t ch = 0; ch < VC; ++ch) store(qq.dst + ch * kLanes, own[ch] / total);
      }
    }
  }
}

struct Scratch {
  std::vector<float> scores, tile, zeros, padded_q;
  std::vector<Query> queries;
};

// Rows [r0, r1) of batch b against key/value head h: every query of those rows (rows x group), sharing the
// walk over the keys every row sees first (the longest common prefix 0, 1, 2, ...).
struct NoStep {
  void operator()() const {}
};

// `before_values` runs between the scores and the outputs (block_attention decodes the values there, into the
// rows the keys were decoded into).
template <int64_t DC, int64_t VC, typename BeforeValues = NoStep>
void attend(const Call& c, int64_t b, int64_t h, int64_t r0, int64_t r1, Scratch& w,
            BeforeValues before_values = NoStep()) {
  const float* kbase = c.k + b * c.ks.batch + h * c.ks.head;
  const float* vbase = c.v + b * c.vs.batch + h * c.vs.head;
  int64_t prefix = -1, size = 0;
  w.queries.clear();
  for (int64_t i = r0; i < r1; ++i) {
    const int64_t row = b * c.queries + i, n = c.count(row);
    if (n <= 0) continue;
    const int64_t p = c.prefix(row);
    prefix = prefix < 0 || p < prefix ? p : prefix;
    for (int64_t g = 0; g < c.group; ++g) {
      const int64_t head = h * c.group + g;
      w.queries.push_back({c.q + b * c.qs.batch + head * c.qs.head + i * c.qs.seq,
                           reinterpret_cast<float*>(size), c.out + (row * c.heads + head) * c.vdim, row, n, 0.0f});
      size += (n + kLanes - 1) / kLanes * kLanes;
    }
  }
  if (w.queries.empty()) return;
  w.scores.resize(size);
  w.tile.resize((c.dim + kLanes - 1) / kLanes * kLanes * kLanes);
  w.zeros.assign(std::max(c.dim, prefix), 0.0f);  // a zero key (scores) and zero weights (values)
  const int64_t qdim = (c.dim + kLanes - 1) / kLanes * kLanes;
  w.padded_q.assign(w.queries.size() * qdim, 0.0f);
  for (size_t i = 0; i < w.queries.size(); ++i) {  // each query's vector, padded with zeros to whole chunks
    Query& qq = w.queries[i];
    qq.scores = w.scores.data() + reinterpret_cast<int64_t>(qq.scores);
    std::memcpy(w.padded_q.data() + i * qdim, qq.q, sizeof(float) * c.dim);
    qq.q = w.padded_q.data() + i * qdim;
  }
  Query* qs = w.queries.data();
  const int64_t nq = w.queries.size();
  // the shared prefix, sixteen keys at a time, for every query
  for (int64_t j0 = 0; j0 < prefix; j0 += kLanes) {
    const int64_t count = prefix - j0 < kLanes ? prefix - j0 : kLanes;
    score<DC>(c, kbase, count, [&](int64_t l) { return j0 + l; }, qs, nq, j0, w.tile.data(), w.zeros.data());
  }
  // each row's own keys after it (its group's queries are adjacent in qs)
  for (int64_t q0 = 0; q0 < nq; q0 += c.group) {
    const int64_t row = qs[q0].row, n = qs[q0].n;
    for (int64_t j0 = prefix; j0 < n; j0 += kLanes) {
      const int64_t count = n - j0 < kLanes ? n - j0 : kLanes;
      score<DC>(c, kbase, count, [&](int64_t l) { return c.key(row, j0 + l); }, qs + q0, c.group, j0, w.tile.data(),
            w.zeros.data());
    }
  }
  for (int64_t i = 0; i < nq; ++i) {
    const int64_t padded = (qs[i].n + kLanes - 1) / kLanes * kLanes;
    for (int64_t j = qs[i].n; j < padded; ++j) qs[i].scores[j] = -std::numeric_limits<float>::infinity();
    softmax(qs[i]);
  }
  before_values();
  weigh_values<VC>(c, vbase, qs, nq, prefix, w.zeros.data());
}

}  // namespace

// query (B, H, Q, D), key/value (B, Hkv, N, D) float32 with a contiguous last dimension.
// Row r = b * Q + i sees keys [start[r], stop[r]) in order, or, when col_ptr is not empty, the keys
// columns[col_ptr[r] .. col_ptr[r + 1]) in order. Returns (B, Q, H, Dv); a row that sees no key gets zeros.
at::Tensor row_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                         const at::Tensor& start, const at::Tensor& stop, const at::Tensor& col_ptr,
                         const at::Tensor& columns, double scaling) {
  TORCH_CHECK(query.scalar_type() == at::kFloat && key.scalar_type() == at::kFloat &&
                  value.scalar_type() == at::kFloat, "row_attention takes float32 tensors");
  TORCH_CHECK(query.dim() == 4 && key.dim() == 4 && value.dim() == 4, "row_attention takes 4-D tensors");
  TORCH_CHECK(query.stride(3) == 1 && key.stride(3) == 1 && value.stride(3) == 1,
              "row_attention needs a contiguous last dimension");
  TORCH_CHECK(start.scalar_type() == at::kLong && stop.scalar_type() == at::kLong && start.is_contiguous() &&
                  stop.is_contiguous(), "row_attention takes contiguous int64 key lists");
  const int64_t batch = query.size(0), heads = query.size(1), queries = query.size(2), dim = query.size(3);
  const int64_t kv_heads = key.size(1), vdim = value.size(3);
  TORCH_CHECK(key.size(3) == dim && heads % kv_heads == 0, "query and key shapes do not match");
  TORCH_CHECK(dim <= kLanes * kMaxChunks && vdim <= kLanes * kMaxChunks, "head dimensions up to 256");
  const bool gathered = col_ptr.numel() > 0;
  TORCH_CHECK(start.numel() == batch * queries && stop.numel() == batch * queries, "one key range per row");
  TORCH_CHECK(!gathered || (col_ptr.numel() == batch * queries + 1 && col_ptr.is_contiguous() &&
                            columns.is_contiguous()), "one column list per row");
  auto out = at::zeros({batch, queries, heads, vdim}, query.options());
  Call c{query.data_ptr<float>(), key.data_ptr<float>(), value.data_ptr<float>(),
         strides_of(query), strides_of(key), strides_of(value),
         queries, heads, kv_heads, heads / kv_heads, dim, vdim,
         start.data_ptr<int64_t>(), stop.data_ptr<int64_t>(),
         gathered ? col_ptr.data_ptr<int64_t>() : nullptr, gathered ? columns.data_ptr<int64_t>() : nullptr,
         static_cast<float>(scaling), out.data_ptr<float>()};
  int64_t work = 0;  // keys summed over rows
  for (int64_t r = 0; r < batch * queries; ++r) work += c.count(r);
  // work items: (batch, kv head, a share of the rows); the split changes no result, only who computes it
  const int64_t shares = queries >= 8 ? 2 : 1;
  const int64_t items = batch * kv_heads * shares;
  const int64_t grain = work * heads * (dim + vdim) < (1 << 21) ? items : 1;
  const int64_t vc = (vdim + kLanes - 1) / kLanes;
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    Scratch w;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / (kv_heads * shares), h = item / shares % kv_heads, share = item % shares;
      const int64_t r0 = queries * share / shares, r1 = queries * (share + 1) / shares;
      // the common head sizes, 64 and 128, compiled apart
      const int64_t shape = dim == vdim && dim % kLanes == 0 ? vc : 0;
      switch (shape) {
        case 4: attend<4, 4>(c, b, h, r0, r1, w); break;
        case 8: attend<8, 8>(c, b, h, r0, r1, w); break;
        default: attend<0, 0>(c, b, h, r0, r1, w);
      }
    }
  });
  return out;
}

// ----- attention over compressed KV blocks (kv_compress/codec.py) -------------------------------------------------
// The cache keeps positions [0, view) in blocks of `block` tokens (codes packed in planes, a step and a zero point
// per group, optionally a low-rank error term and outliers) and [view, view + E) exactly. Per (batch, key/value
// head) the blocks are decoded into a thread's scratch rows, the exact rows copied after them, and `attend` runs
// on that as on a plain cache: each row's result is the one row_attention gives on the decompressed tensors, bit
// for bit, because decoding repeats BlockCodec.decompress's float32 operations in its order:
//   y = float(code) * step + zero;  y = y + a_r * b_r for each rank r in turn;  outliers written over y
// with step = s_max * table[scale code] and zero = z_min + float(zero code) * z_step (8-bit scales), or the
// float16 step and zero as they are (16-bit scales).

namespace {

constexpr int64_t kMaxRank = 8;

struct BlockSet {
  const uint8_t* codes = nullptr;
  int64_t code_bytes = 0;  // per block
  const uint8_t *scale8 = nullptr, *zero8 = nullptr;
  const at::Half *meta = nullptr, *scale16 = nullptr, *zero16 = nullptr;
  int64_t groups = 0;  // per block
  const at::Half *lr_a = nullptr, *lr_b = nullptr;
  int64_t rank = 0;
  const at::Half* out_values = nullptr;
  const int16_t* out_index16 = nullptr;
  const int32_t* out_index32 = nullptr;
  int64_t outliers = 0;  // per block
  int64_t bits = 4, value_groups = 0, group = 0;  // value_groups: 0 keys (per channel), 1 values (per token)
  int64_t heads = 0, stored = 0;  // blocks stored per (batch, head)
  const float* sink = nullptr;  // (B, H, sink_rows, dim): exact rows written over the first block's first rows
  int64_t sink_rows = 0;
};

// tensors: codes, scale, zero, meta, lr_a, lr_b, out_values, out_index, sink (undefined or empty where absent);
// layout: bits, 0 for keys / 1 for values, group
BlockSet block_set(const std::vector<at::Tensor>& t, const std::vector<int64_t>& layout, int64_t block, int64_t dim) {
  TORCH_CHECK(t.size() == 9 && layout.size() == 3, "block_attention: 9 block tensors and 3 layout figures");
  auto has = [&](int i) { return t[i].defined() && t[i].numel() > 0; };
  for (int i = 0; i < 9; ++i) TORCH_CHECK(!has(i) || t[i].is_contiguous(), "block_attention: contiguous blocks");
  BlockSet s;
  s.bits = layout[0];
  s.value_groups = layout[1];
  s.group = layout[2];
  TORCH_CHECK(s.bits == 2 || s.bits == 4 || s.bits == 8, "block_attention: 2, 4 or 8 bits");
  TORCH_CHECK(t[0].scalar_type() == at::kByte && t[0].dim() == 4, "block_attention: uint8 codes (B, H, N, bytes)");
  s.heads = t[0].size(1);
  s.stored = t[0].size(2);
  s.code_bytes = t[0].size(3);
  TORCH_CHECK(s.code_bytes * 8 == block * dim * s.bits, "block_attention: codes do not match the block");
  s.codes = t[0].data_ptr<uint8_t>();
  s.groups = t[1].size(3);
  if (has(3)) {
    TORCH_CHECK(t[1].scalar_type() == at::kByte && t[2].scalar_type() == at::kByte &&
                    t[3].scalar_type() == at::kHalf, "block_attention: 8-bit scales with float16 meta");
    s.scale8 = t[1].data_ptr<uint8_t>();
    s.zero8 = t[2].data_ptr<uint8_t>();
    s.meta = t[3].data_ptr<at::Half>();
  } else {
    TORCH_CHECK(t[1].scalar_type() == at::kHalf && t[2].scalar_type() == at::kHalf,
                "block_attention: float16 scales");
    s.scale16 = t[1].data_ptr<at::Half>();
    s.zero16 = t[2].data_ptr<at::Half>();
  }
  if (has(4)) {
    TORCH_CHECK(t[4].scalar_type() == at::kHalf && t[5].scalar_type() == at::kHalf, "block_attention: float16 factors");
    s.rank = t[4].size(4);
    TORCH_CHECK(s.rank <= kMaxRank, "block_attention: a rank up to 8");
    s.lr_a = t[4].data_ptr<at::Half>();
    s.lr_b = t[5].data_ptr<at::Half>();
  }
  if (has(6)) {
    s.outliers = t[6].size(3);
    s.out_values = t[6].data_ptr<at::Half>();
    if (t[7].scalar_type() == at::kShort) s.out_index16 = t[7].data_ptr<int16_t>();
    else {
      TORCH_CHECK(t[7].scalar_type() == at::kInt, "block_attention: int16 or int32 outlier indices");
      s.out_index32 = t[7].data_ptr<int32_t>();
    }
  }
  if (has(8)) {
    TORCH_CHECK(t[8].scalar_type() == at::kFloat && t[8].dim() == 4 && t[8].size(1) == s.heads &&
                    t[8].size(0) == t[0].size(0) && t[8].size(3) == dim && t[8].size(2) < block,
                "block_attention: float32 sink rows (B, H, rows < block, dim)");
    s.sink = t[8].data_ptr<float>();
    s.sink_rows = t[8].size(2);
  }
  return s;
}

// Block n of (b, h) -> y (block x dim float32, row-major); steps and zeros go through sz (2 * groups floats).
void decode_block(const BlockSet& s, int64_t b, int64_t h, int64_t n, int64_t block, int64_t dim,
                  const float* table, float* y, float* sz) {
  const int64_t at = (b * s.heads + h) * s.stored + n;
  float *step = sz, *zero = sz + s.groups;
  if (s.meta) {
    const at::Half* m = s.meta + at * 3;
    const float s_max = static_cast<float>(m[0]), z_min = static_cast<float>(m[1]), z_step = static_cast<float>(m[2]);
    const uint8_t *sc = s.scale8 + at * s.groups, *zc = s.zero8 + at * s.groups;
    for (int64_t g = 0; g < s.groups; ++g) {
      step[g] = s_max * table[sc[g]];
      zero[g] = z_min + static_cast<float>(zc[g]) * z_step;
    }
  } else {
    for (int64_t g = 0; g < s.groups; ++g) {
      step[g] = static_cast<float>(s.scale16[at * s.groups + g]);
      zero[g] = static_cast<float>(s.zero16[at * s.groups + g]);
    }
  }
  const int64_t per = 8 / s.bits, rows = block / per;
  const uint8_t* codes = s.codes + at * s.code_bytes;
  const int64_t key_group = s.value_groups ? 1 : (block % s.group == 0 ? s.group : block);
  const int64_t value_group = s.value_groups ? (dim % s.group == 0 ? s.group : dim) : 1;
  const at::Half* a = s.rank ? s.lr_a + at * block * s.rank : nullptr;
  float factors[kMaxRank * kLanes * kMaxChunks];  // the low-rank term's rows b_r as float32
  for (int64_t r = 0; r < s.rank; ++r)
    for (int64_t c = 0; c < dim; ++c) factors[r * dim + c] = static_cast<float>(s.lr_b[(at * s.rank + r) * dim + c]);
  const uint32_t mask = (1u << s.bits) - 1u;
  for (int64_t plane = 0; plane < per; ++plane) {
    const uint32_t shift = static_cast<uint32_t>(plane * s.bits);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t t = plane * rows + r;
      const uint8_t* bytes = codes + r * dim;
      float* out = y + t * dim;
      // (plain loops: the compiler vectorizes them, the same two operations per entry)
      if (s.value_groups) {  // per token: groups of value_group channels
        const float* st = step + t * (dim / value_group);
        const float* zt = zero + t * (dim / value_group);
        for (int64_t c0 = 0; c0 < dim; c0 += value_group) {
          const float sg = st[c0 / value_group], zg = zt[c0 / value_group];
          int64_t c = c0;
          for (; c + kLanes <= c0 + value_group; c += kLanes)  // a fixed count: the compiler vectorizes it
            for (int64_t l = 0; l < kLanes; ++l)
              out[c + l] = static_cast<float>((static_cast<uint32_t>(bytes[c + l]) >> shift) & mask) * sg + zg;
          for (; c < c0 + value_group; ++c)
            out[c] = static_cast<float>((static_cast<uint32_t>(bytes[c]) >> shift) & mask) * sg + zg;
        }
      } else {  // per channel: each channel's key_group tokens
        const float* st = step + (t / key_group) * dim;
        const float* zt = zero + (t / key_group) * dim;
        for (int64_t c = 0; c < dim; ++c)
          out[c] = static_cast<float>((static_cast<uint32_t>(bytes[c]) >> shift) & mask) * st[c] + zt[c];
      }
      for (int64_t k = 0; k < s.rank; ++k) {  // the error term, one rank after the other, as decompress adds it
        const float ak = static_cast<float>(a[t * s.rank + k]);
        const float* bk = factors + k * dim;
        for (int64_t c = 0; c < dim; ++c) out[c] = out[c] + ak * bk[c];
      }
    }
  }
  for (int64_t k = 0; k < s.outliers; ++k) {
    const int64_t index = s.out_index16 ? s.out_index16[at * s.outliers + k] : s.out_index32[at * s.outliers + k];
    y[index] = static_cast<float>(s.out_values[at * s.outliers + k]);
  }
  if (n == 0 && s.sink_rows)  // the exact sink rows, written over the first block last (as the cache does)
    std::memcpy(y, s.sink + (b * s.heads + h) * s.sink_rows * dim, sizeof(float) * s.sink_rows * dim);
}

}  // namespace

// query (B, H, Q, D) float32; exact_key/exact_value (B, Hkv, E, D) float32, positions view .. view + E; the first
// view / block blocks of key_blocks / value_blocks (see block_set) hold positions 0 .. view. Key lists as in
// row_attention, over positions 0 .. view + E. table: the 256 float32 scale factors of 8-bit scales.
at::Tensor block_attention(const at::Tensor& query, const at::Tensor& exact_key, const at::Tensor& exact_value,
                           int64_t view, int64_t block, const std::vector<at::Tensor>& key_blocks,
                           const std::vector<at::Tensor>& value_blocks, const std::vector<int64_t>& key_layout,
                           const std::vector<int64_t>& value_layout, const at::Tensor& table, const at::Tensor& start,
                           const at::Tensor& stop, const at::Tensor& col_ptr, const at::Tensor& columns,
                           double scaling) {
  TORCH_CHECK(query.scalar_type() == at::kFloat && exact_key.scalar_type() == at::kFloat &&
                  exact_value.scalar_type() == at::kFloat, "block_attention takes float32 tensors");
  TORCH_CHECK(query.dim() == 4 && exact_key.dim() == 4 && exact_value.dim() == 4 && query.stride(3) == 1 &&
                  exact_key.stride(3) == 1 && exact_value.stride(3) == 1,
              "block_attention takes 4-D tensors with a contiguous last dimension");
  TORCH_CHECK(table.scalar_type() == at::kFloat && table.numel() == 256 && table.is_contiguous(),
              "block_attention: a table of 256 float32 scale factors");
  TORCH_CHECK(view >= 0 && block > 0 && view % block == 0, "block_attention: the view is whole blocks");
  const int64_t batch = query.size(0), heads = query.size(1), queries = query.size(2), dim = query.size(3);
  const int64_t kv_heads = exact_key.size(1), vdim = exact_value.size(3), exact = exact_key.size(2);
  TORCH_CHECK(exact_key.size(3) == dim && heads % kv_heads == 0 && exact_value.size(2) == exact,
              "query and key shapes do not match");
  TORCH_CHECK(dim <= kLanes * kMaxChunks && vdim <= kLanes * kMaxChunks, "head dimensions up to 256");
  const int64_t n_blocks = view / block;
  BlockSet keys, values;
  if (n_blocks) {
    keys = block_set(key_blocks, key_layout, block, dim);
    values = block_set(value_blocks, value_layout, block, vdim);
    TORCH_CHECK(keys.stored >= n_blocks && values.stored >= n_blocks && keys.heads == kv_heads &&
                    values.heads == kv_heads, "block_attention: fewer blocks than the view");
  }
  const bool gathered = col_ptr.numel() > 0;
  TORCH_CHECK(start.numel() == batch * queries && stop.numel() == batch * queries, "one key range per row");
  TORCH_CHECK(!gathered || (col_ptr.numel() == batch * queries + 1 && col_ptr.is_contiguous() &&
                            columns.is_contiguous()), "one column list per row");
  auto out = at::zeros({batch, queries, heads, vdim}, query.options());
  const int64_t length = view + exact;
  Call c{query.data_ptr<float>(), nullptr, nullptr, strides_of(query), {0, 0, dim}, {0, 0, vdim},
         queries, heads, kv_heads, heads / kv_heads, dim, vdim,
         start.data_ptr<int64_t>(), stop.data_ptr<int64_t>(),
         gathered ? col_ptr.data_ptr<int64_t>() : nullptr, gathered ? columns.data_ptr<int64_t>() : nullptr,
         static_cast<float>(scaling), out.data_ptr<float>()};
  const float* factors = table.data_ptr<float>();
  const float *ek = exact_key.data_ptr<float>(), *ev = exact_value.data_ptr<float>();
  const Strides eks = strides_of(exact_key), evs = strides_of(exact_value);
  const int64_t vc = (vdim + kLanes - 1) / kLanes;
  const int64_t items = batch * kv_heads;
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    Scratch w;
    // the decoded rows, kept from call to call (a fresh 1-2 MB buffer per call costs page faults): the keys,
    // then, once the scores are taken, the values in the same rows (half the memory: it stays in cache)
    thread_local std::vector<float> rows, sz;
    const size_t need = static_cast<size_t>(length * std::max(dim, vdim));
    if (rows.size() < need) rows.resize(need);
    if (sz.size() < static_cast<size_t>(2 * std::max(keys.groups, values.groups)))
      sz.resize(2 * std::max(keys.groups, values.groups));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / kv_heads, h = item % kv_heads;
      for (int64_t n = 0; n < n_blocks; ++n)
        decode_block(keys, b, h, n, block, dim, factors, rows.data() + n * block * dim, sz.data());
      for (int64_t j = 0; j < exact; ++j)
        std::memcpy(rows.data() + (view + j) * dim, ek + b * eks.batch + h * eks.head + j * eks.seq,
                    sizeof(float) * dim);
      auto decode_values = [&]() {
        for (int64_t n = 0; n < n_blocks; ++n)
          decode_block(values, b, h, n, block, vdim, factors, rows.data() + n * block * vdim, sz.data());
        for (int64_t j = 0; j < exact; ++j)
          std::memcpy(rows.data() + (view + j) * vdim, ev + b * evs.batch + h * evs.head + j * evs.seq,
                      sizeof(float) * vdim);
      };
      Call own = c;
      own.k = own.v = rows.data();
      const int64_t shape = dim == vdim && dim % kLanes == 0 ? vc : 0;
      switch (shape) {
        case 4: attend<4, 4>(own, b, h, 0, queries, w, decode_values); break;
        case 8: attend<8, 8>(own, b, h, 0, queries, w, decode_values); break;
        default: attend<0, 0>(own, b, h, 0, queries, w, decode_values);
      }
    }
  });
  return out;
}
