// Row-invariant weight-only matmul on the CPU: y = x W^T with W held as 4-bit or 8-bit codes per group of 32
// inputs (W = code * scale + minimum, GGUF's Q4_0/Q4_1/Q4_K/Q8_0 form) or as GGUF's Q6_K (6-bit, below), and x
// quantized per group of 32 to int8.
//
// For every row m, output column n and group g:
//   d[m,g] = max |x[m, g]| / 127        q[m,k] = nearbyint(x[m,k] / d[m,g]) (0 where d is 0)
//   dot    = sum_k code[n,k] * q[m,k]   (integers: exact in any order)
//   qsum   = sum_k q[m,k]               (integer)
//   y[m,n] = y[m,n] + ((float(dot) * scale[n,g] + minimum[n,g] * float(qsum)) * d[m,g])   over g in order
// The float part is five IEEE operations per group in a fixed order (built with -ffp-contract=off, no fused
// operations), so a row's output is bitwise the same whatever other rows share the call, however the columns are
// split between threads, and whichever of the integer routines below the machine runs (AVX-512 VNNI or plain C++).
// `reference_group_matmul` in quantized.py computes the same bits with torch operations.
//
// Weight layout (`pack` in quantized.py): blocks of 16 output columns; per block and group, the codes of the
// 16 columns x 32 inputs as 8 quads of 4 consecutive inputs, each quad 64 bytes (byte 4 * column + i). 8-bit codes
// take 512 bytes per block and group; 4-bit codes 256: byte j of pair p holds quad 2p in its low nibble and quad
// 2p + 1 in its high nibble. Scales and minimums are (blocks, groups, 16): float32, float16, or factored as an 8-bit
// step per group times a float16 unit per 8 groups (GGUF Q4_K's d * sc and -dmin * m; the product of a float16
// number and an integer below 256 is exact in float32, so the factored form gives the bits of the float32 one).
//
// 6-bit weights (GGUF Q6_K: W = d * sc * (code - 32), code in [0, 63], an int8 sc per 16 inputs, a float16 d per
// 256): per group the integer part takes both halves' sub-scales,
//   dot = sc[n, 2g] * sum_{k in half 0} (code - 32) q  +  sc[n, 2g + 1] * sum_{k in half 1} (code - 32) q
// (below 2^24 in magnitude: exact as a float32), and y[m,n] = y[m,n] + ((float(dot) * d[n, g / 8]) * d[m,g]).
// Layout: 384 bytes per block and group: the low 4 bits of the codes as 4-bit codes are laid out (256 bytes), then
// their top 2 bits (128 bytes: byte 4 * column + i of half h holds quads 4h..4h+3 at bits 0-1, 2-3, 4-5, 6-7).
// `scale` holds d as (n/16, k/256, 16) float16, and the minimum's place the int8 sub-scales as (n/16, k/32, 32)
// (per group half 0's 16 columns, then half 1's).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define LEAPDECODE_VNNI 1
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "lanes.h"

namespace {

constexpr int64_t kGroup = 32;
constexpr int64_t kCols = 16;
constexpr int kTile = 8;  // rows computed together (one pass over a block's codes)
constexpr int kTile6 = 4;  // the same for 6-bit weights
constexpr int64_t kAhead = 2048;  // bytes of codes prefetched ahead of the group being computed

using leapdecode::i16;
using leapdecode::load;
using leapdecode::splat;
using leapdecode::store;
using leapdecode::v16;
// 16 float32, float16 or uint8 values as float32 lanes (exact)
#if defined(__AVX512F__)
inline v16 from_register(__m512 wide) {
  v16 r;
  std::memcpy(&r, &wide, 64);
  return r;
}
inline v16 lanes_of(const float* p) { return load(p); }
inline v16 lanes_of(const at::Half* p) {
  return from_register(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
}
inline v16 lanes_of(const uint8_t* p) {
  return from_register(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))));
}
#else
template <typename T>
inline v16 lanes_of(const T* p) {
  v16 r;
  for (int l = 0; l < kCols; ++l) r[l] = static_cast<float>(p[l]);
  return r;
}
#endif

// The per-group values (scale or minimum) of the 16 columns of one block, stored as they are (T: float or half).
template <typename T>
struct Direct {
  const T* p;
  v16 at(int64_t g) const { return lanes_of(p + g * kCols); }
  Direct block(int64_t b, int64_t groups) const { return {p + b * groups * kCols}; }
};

// The same values as an 8-bit step per group times a float16 unit per 8 groups.
struct Factored {
  static constexpr int64_t kSpan = 8;
  const uint8_t* step;
  const at::Half* unit;
  v16 at(int64_t g) const { return lanes_of(step + g * kCols) * lanes_of(unit + (g / kSpan) * kCols); }
  Factored block(int64_t b, int64_t groups) const {
    return {step + b * groups * kCols, unit + b * (groups / kSpan) * kCols};
  }
};

// Per row and group: the int8 codes of the activations, their scale d and the sum of the codes.
struct Rows {
  std::vector<int8_t> q;
  std::vector<float> d;
  std::vector<float> qsum;
  std::vector<int32_t> half_sum;  // per row, group and half of 16: the sum of the codes (6-bit weights)
};

Rows quantize(const float* x, int64_t rows, int64_t k) {
  const int64_t groups = k / kGroup;
  Rows out{std::vector<int8_t>(rows * k), std::vector<float>(rows * groups), std::vector<float>(rows * groups),
           std::vector<int32_t>(rows * groups * 2)};
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t g = 0; g < groups; ++g) {
      const float* xg = x + m * k + g * kGroup;
      float amax = 0.0f;
      for (int i = 0; i < kGroup; ++i) amax = std::max(amax, std::fabs(xg[i]));
      const float d = amax / 127.0f;
      int8_t* qg = out.q.data() + m * k + g * kGroup;
      int32_t half[2] = {0, 0};
      for (int i = 0; i < kGroup; ++i) {
        float v = d == 0.0f ? 0.0f : std::nearbyint(xg[i] / d);
        v = std::min(127.0f, std::max(-127.0f, v));
        qg[i] = static_cast<int8_t>(v);
        half[i / 16] += qg[i];
      }
      out.d[m * groups + g] = d;
      out.qsum[m * groups + g] = static_cast<float>(half[0] + half[1]);
      out.half_sum[(m * groups + g) * 2] = half[0];
      out.half_sum[(m * groups + g) * 2 + 1] = half[1];
    }
  }
  return out;
}

// dot[r] (16 columns) for NR rows over one group; codes of the block and group at `w`, activations at xq[r]
template <int BITS, int NR>
inline void group_dots(const uint8_t* w, const int8_t* const* xq, i16* dot) {
#if defined(LEAPDECODE_VNNI)
  __m512i acc[NR];
  for (int r = 0; r < NR; ++r) acc[r] = _mm512_setzero_si512();
  if constexpr (BITS == 4) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    for (int p = 0; p < 4; ++p) {
      const __m512i packed = _mm512_loadu_si512(w + 64 * p);
      const __m512i a = _mm512_and_si512(packed, low);
      const __m512i b = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low);
      for (int r = 0; r < NR; ++r) {
        int32_t xa, xb;
        std::memcpy(&xa, xq[r] + 8 * p, 4);
        std::memcpy(&xb, xq[r] + 8 * p + 4, 4);
        acc[r] = _mm512_dpbusd_epi32(acc[r], a, _mm512_set1_epi32(xa));
        acc[r] = _mm512_dpbusd_epi32(acc[r], b, _mm512_set1_epi32(xb));
      }
    }
  } else {
    for (int quad = 0; quad < 8; ++quad) {
      const __m512i codes = _mm512_loadu_si512(w + 64 * quad);
      for (int r = 0; r < NR; ++r) {
        int32_t xa;
        std::memcpy(&xa, xq[r] + 4 * quad, 4);
        acc[r] = _mm512_dpbusd_epi32(acc[r], codes, _mm512_set1_epi32(xa));
      }
    }
  }
  for (int r = 0; r < NR; ++r) std::memcpy(&dot[r], &acc[r], 64);
#else
  for (int r = 0; r < NR; ++r) {
    i16 acc = {0};
    for (int quad = 0; quad < 8; ++quad) {
      for (int c = 0; c < kCols; ++c) {
        int32_t s = 0;
        for (int i = 0; i < 4; ++i) {
          int32_t code;
          if constexpr (BITS == 4) {
            const uint8_t byte = w[64 * (quad / 2) + 4 * c + i];
            code = (quad % 2 == 0) ? (byte & 0x0F) : (byte >> 4);
          } else {
            code = w[64 * quad + 4 * c + i];
          }
          s += code * static_cast<int32_t>(xq[r][4 * quad + i]);
        }
        acc[c] += s;
      }
    }
    dot[r] = acc;
  }
#endif
}

// 6-bit weights, quads 2P and 2P + 1 of a group (P = 0, 1: half 0; 2, 3: half 1) into acc[r]: the low nibbles
// as 4-bit codes have them, the top bits moved to bits 4-5 of each byte (quad q's sit at bits 2 (q % 4) + {0, 1}
// of the top-bit bytes of its half)
#if defined(LEAPDECODE_VNNI)
template <int NR, int P>
__attribute__((always_inline)) inline void six_bit_quads(const uint8_t* w, const int8_t* const* xq, __m512i* acc) {
  const __m512i low = _mm512_set1_epi8(0x0F), top = _mm512_set1_epi8(0x30);
  const __m512i packed = _mm512_loadu_si512(w + 64 * P);
  const __m512i high = _mm512_loadu_si512(w + 256 + 64 * (P / 2));
  const __m512i ha = (P % 2 == 0) ? _mm512_slli_epi16(high, 4) : high;
  const __m512i hb = (P % 2 == 0) ? _mm512_slli_epi16(high, 2) : _mm512_srli_epi16(high, 2);
  const __m512i a = _mm512_ternarylogic_epi32(packed, low, _mm512_and_si512(ha, top), 0xEA);  // (packed & low) | h
  const __m512i b = _mm512_ternarylogic_epi32(_mm512_srli_epi16(packed, 4), low, _mm512_and_si512(hb, top), 0xEA);
  for (int r = 0; r < NR; ++r) {
    int32_t xa, xb;
    std::memcpy(&xa, xq[r] + 8 * P, 4);
    std::memcpy(&xb, xq[r] + 8 * P + 4, 4);
    acc[r] = _mm512_dpbusd_epi32(acc[r], a, _mm512_set1_epi32(xa));
    acc[r] = _mm512_dpbusd_epi32(acc[r], b, _mm512_set1_epi32(xb));
  }
}
#endif

// 6-bit weights: dot[r] (16 columns) for NR rows over one group as float32 (exact integers), the sub-scales `sub`
// (half 0's 16 columns, then half 1's) applied (see the top); hs[r] is row r's two half sums of this group
template <int NR>
__attribute__((always_inline)) inline void group_dots6(const uint8_t* w, const int8_t* sub, const int8_t* const* xq, const int32_t* const* hs,
                        v16* dot) {
#if defined(LEAPDECODE_VNNI)
  __m512i acc0[NR], acc1[NR];
  for (int r = 0; r < NR; ++r) acc0[r] = acc1[r] = _mm512_setzero_si512();
  six_bit_quads<NR, 0>(w, xq, acc0);
  six_bit_quads<NR, 1>(w, xq, acc0);
  six_bit_quads<NR, 2>(w, xq, acc1);
  six_bit_quads<NR, 3>(w, xq, acc1);
  // each half's integer times its sub-scale is below 2^24 in magnitude, and so is their sum: the float32
  // products and sum are exact, the bits of the integer formula with cheaper operations than integer multiplies
  const __m512 sc0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sub))));
  const __m512 sc1 =
      _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sub + 16))));
  for (int r = 0; r < NR; ++r) {
    const __m512 h0 = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc0[r], _mm512_set1_epi32(32 * hs[r][0])));
    const __m512 h1 = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc1[r], _mm512_set1_epi32(32 * hs[r][1])));
    const __m512 t = _mm512_add_ps(_mm512_mul_ps(h0, sc0), _mm512_mul_ps(h1, sc1));
    std::memcpy(&dot[r], &t, 64);
  }
#else
  for (int r = 0; r < NR; ++r) {
    v16 acc = splat(0.0f);
    for (int c = 0; c < kCols; ++c) {
      int32_t half[2] = {0, 0};
      for (int quad = 0; quad < 8; ++quad) {
        for (int i = 0; i < 4; ++i) {
          const uint8_t byte = w[64 * (quad / 2) + 4 * c + i];
          const int32_t lo = (quad % 2 == 0) ? (byte & 0x0F) : (byte >> 4);
          const int32_t hi = (w[256 + 64 * (quad / 4) + 4 * c + i] >> (2 * (quad % 4))) & 3;
          half[quad / 4] += (lo + 16 * hi - 32) * static_cast<int32_t>(xq[r][4 * quad + i]);
        }
      }
      acc[c] = static_cast<float>(half[0] * sub[c] + half[1] * sub[16 + c]);
    }
    dot[r] = acc;
  }
#endif
}

// the float16 d of 6-bit weights: one per 8 groups (a Q6_K super-block) and column
struct PerSpan {
  static constexpr int64_t kSpan = 8;
  const at::Half* p;
  v16 at(int64_t g) const { return lanes_of(p + (g / kSpan) * kCols); }
  PerSpan block(int64_t b, int64_t groups) const { return {p + b * (groups / kSpan) * kCols}; }
};

// the int8 sub-scales of 6-bit weights: 32 per group (two halves of 16 columns)
struct SubScales {
  const int8_t* p;
  const int8_t* at(int64_t g) const { return p + g * 2 * kCols; }
  SubScales block(int64_t b, int64_t groups) const { return {p + b * groups * 2 * kCols}; }
};

constexpr int64_t group_bytes(int bits) { return bits == 4 ? 256 : bits == 6 ? 384 : 512; }

template <int BITS, typename S, typename M, int NR>
void tile(const uint8_t* w, const S& scale, const M& minimum, const Rows& x, int64_t m0, int64_t groups, int64_t k,
          float* out, int64_t ldo) {
  constexpr int64_t kBytes = group_bytes(BITS);
  v16 acc[NR];
  for (int r = 0; r < NR; ++r) acc[r] = splat(0.0f);
  for (int64_t g = 0; g < groups; ++g) {
    const int8_t* xq[NR];
    for (int r = 0; r < NR; ++r) xq[r] = x.q.data() + (m0 + r) * k + g * kGroup;
    // the codes a few groups ahead (the hardware prefetcher alone left a one-row pass at about 2/3 of the
    // machine's read bandwidth)
    for (int64_t line = 0; line < kBytes; line += 64) __builtin_prefetch(w + g * kBytes + kAhead + line);
    const v16 s = scale.at(g);
    if constexpr (BITS == 6) {
      const int32_t* hs[NR];
      for (int r = 0; r < NR; ++r) hs[r] = x.half_sum.data() + ((m0 + r) * groups + g) * 2;
      v16 dot[NR];
      group_dots6<NR>(w + g * kBytes, minimum.at(g), xq, hs, dot);
      for (int r = 0; r < NR; ++r) {
        const v16 t = dot[r] * s;
        acc[r] = acc[r] + t * splat(x.d[(m0 + r) * groups + g]);
      }
    } else {
      i16 dot[NR];
      group_dots<BITS, NR>(w + g * kBytes, xq, dot);
      const v16 mn = minimum.at(g);
      for (int r = 0; r < NR; ++r) {
        const int64_t at = (m0 + r) * groups + g;
        v16 t = __builtin_convertvector(dot[r], v16) * s;
        t = t + mn * splat(x.qsum[at]);
        acc[r] = acc[r] + t * splat(x.d[at]);
      }
    }
  }
  for (int r = 0; r < NR; ++r) store(out + (m0 + r) * ldo, acc[r]);
}

template <int BITS, typename S, typename M>
void block(const uint8_t* w, const S& scale, const M& minimum, const Rows& x, int64_t rows, int64_t groups, int64_t k,
           float* out, int64_t ldo) {
  int64_t m = 0;
  if constexpr (BITS == 6) {  // two accumulators a row: 4 rows at once measured no slower than 8
    for (; m + kTile6 <= rows; m += kTile6) tile<BITS, S, M, kTile6>(w, scale, minimum, x, m, groups, k, out, ldo);
  }
  for (; m + kTile <= rows; m += kTile) tile<BITS, S, M, kTile>(w, scale, minimum, x, m, groups, k, out, ldo);
  switch (rows - m) {
    case 7: tile<BITS, S, M, 7>(w, scale, minimum, x, m, groups, k, out, ldo); break;
    case 6: tile<BITS, S, M, 6>(w, scale, minimum, x, m, groups, k, out, ldo); break;
    case 5: tile<BITS, S, M, 5>(w, scale, minimum, x, m, groups, k, out, ldo); break;
    case 4: tile<BITS, S, M, 4>(w, scale, minimum, x, m, groups, k, out, ldo); break;
    case 3: tile<BITS, S, M, 3>(w, scale, minimum, x, m, groups, k, out, ldo); break;
    case 2: tile<BITS, S, M, 2>(w, scale, minimum, x, m, groups, k, out, ldo); break;
    case 1: tile<BITS, S, M, 1>(w, scale, minimum, x, m, groups, k, out, ldo); break;
    default: break;
  }
}

template <int BITS, typename S, typename M>
void run(const uint8_t* codes, const S& scale, const M& minimum, const Rows& x, int64_t rows, int64_t n, int64_t k,
         float* out) {
  const int64_t groups = k / kGroup;
  const int64_t blocks = n / kCols;
  const int64_t bytes = group_bytes(BITS) * groups;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      block<BITS, S, M>(codes + b * bytes, scale.block(b, groups), minimum.block(b, groups), x, rows, groups, k,
                     out + b * kCols, n);
  });
}

template <typename S>
void dispatch(int64_t bits, const uint8_t* codes, const S& scale, const S& minimum, const Rows& x, int64_t rows,
              int64_t n, int64_t k, float* out) {
  bits == 4 ? run<4, S, S>(codes, scale, minimum, x, rows, n, k, out)
            : run<8, S, S>(codes, scale, minimum, x, rows, n, k, out);
}

// One weight matrix as Python hands it over (GroupLinear's buffers): codes, scale, minimum, scale_unit,
// minimum_unit, and its bits.
struct Matrix {
  const at::Tensor &codes, &scale, &minimum, &scale_unit, &minimum_unit;
  int64_t bits;

  // the output width n, after checking the tensors against an input width k
  int64_t check(int64_t k) const {
    TORCH_CHECK(codes.dtype() == at::kByte && codes.dim() == 3 && codes.is_contiguous(), "codes: (n/16, k/32, bytes)");
    TORCH_CHECK(bits == 4 || bits == 6 || bits == 8, "bits: 4, 6 or 8");
    const int64_t n = codes.size(0) * kCols;
    TORCH_CHECK(codes.size(1) * kGroup == k && codes.size(2) == group_bytes(bits), "codes do not match x");
    const auto dtype = scale.scalar_type();
    if (bits == 6) {
      TORCH_CHECK((k / kGroup) % PerSpan::kSpan == 0 && dtype == at::kHalf && scale.is_contiguous() &&
                      scale.numel() == n / kCols * (k / kGroup / PerSpan::kSpan) * kCols,
                  "6-bit weights: scale (n/16, k/256, 16) float16");
      TORCH_CHECK(minimum.scalar_type() == at::kChar && minimum.is_contiguous() &&
                      minimum.numel() == n / kCols * (k / kGroup) * 2 * kCols,
                  "6-bit weights: sub-scales (n/16, k/32, 32) int8 in the minimum's place");
      return n;
    }
    TORCH_CHECK(scale.sizes() == minimum.sizes() && dtype == minimum.scalar_type() &&
                    (dtype == at::kFloat || dtype == at::kHalf || dtype == at::kByte) && scale.is_contiguous() &&
                    minimum.is_contiguous() && scale.numel() == n / kCols * (k / kGroup) * kCols,
                "scale, minimum: (n/16, k/32, 16), both float32, both float16 or both uint8 steps");
    if (dtype == at::kByte) {
      TORCH_CHECK((k / kGroup) % Factored::kSpan == 0 && scale_unit.scalar_type() == at::kHalf &&
                      minimum_unit.scalar_type() == at::kHalf && scale_unit.is_contiguous() &&
                      minimum_unit.is_contiguous() &&
                      scale_unit.numel() == n / kCols * (k / kGroup / Factored::kSpan) * kCols &&
                      minimum_unit.numel() == scale_unit.numel(),
                  "scale_unit, minimum_unit: (n/16, k/256, 16) float16 with uint8 steps");
    }
    return n;
  }

  // out (rows, n) = the quantized rows x times this matrix
  void apply(const Rows& x, int64_t rows, int64_t k, float* out) const {
    const int64_t n = codes.size(0) * kCols;
    const uint8_t* c = codes.data_ptr<uint8_t>();
    const auto dtype = scale.scalar_type();
    if (bits == 6) {
      run<6, PerSpan, SubScales>(c, PerSpan{scale.data_ptr<at::Half>()}, SubScales{minimum.data_ptr<int8_t>()}, x,
                                 rows, n, k, out);
    } else if (dtype == at::kFloat) {
      dispatch(bits, c, Direct<float>{scale.data_ptr<float>()}, Direct<float>{minimum.data_ptr<float>()}, x, rows, n,
               k, out);
    } else if (dtype == at::kHalf) {
      dispatch(bits, c, Direct<at::Half>{scale.data_ptr<at::Half>()}, Direct<at::Half>{minimum.data_ptr<at::Half>()},
               x, rows, n, k, out);
    } else {
      dispatch(bits, c, Factored{scale.data_ptr<uint8_t>(), scale_unit.data_ptr<at::Half>()},
               Factored{minimum.data_ptr<uint8_t>(), minimum_unit.data_ptr<at::Half>()}, x, rows, n, k, out);
    }
  }
};

Matrix matrix_of(const std::vector<at::Tensor>& t, int64_t bits) {
  TORCH_CHECK(t.size() == 5, "a matrix is (codes, scale, minimum, scale_unit, minimum_unit)");
  return {t[0], t[1], t[2], t[3], t[4], bits};
}

enum Activation : int64_t { kSilu = 0, kGeluTanh = 1 };

// a(g) * u lane-wise: silu(g) = g / (1 + exp(-g)); gelu_tanh(g) = g / 2 * (1 + tanh(c (g + 0.044715 g^3))), with
// tanh(y) = 1 - 2 / (exp(2y) + 1). Fixed operations per lane (the lanes of a row are its columns, so a value's bits
// depend only on its own inputs).
inline v16 gated(v16 g, v16 u, int64_t activation) {
  const v16 one = splat(1.0f);
  if (activation == kSilu) return (g / (one + leapdecode::exp_lanes(-g))) * u;
  const v16 y = (g + (g * g * g) * 0.044715f) * 0.7978845608028654f;
  const v16 tanh = one - splat(2.0f) / (leapdecode::exp_lanes(y + y) + one);
  return ((g * 0.5f) * (one + tanh)) * u;
}

}  // namespace

// x (rows, k) float32; codes (n / 16, k / 32, 256, 384 or 512) uint8 (6-bit weights: see the top); scale, minimum (n / 16, k / 32, 16) float32 or
// float16 (GGUF's own scales are float16: half the bytes to read), or uint8 steps with scale_unit, minimum_unit
// (n / 16, k / 256, 16) float16 (factored; empty tensors otherwise) -> (rows, n) float32
at::Tensor group_matmul(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                        const at::Tensor& minimum, const at::Tensor& scale_unit, const at::Tensor& minimum_unit,
                        int64_t bits) {
  TORCH_CHECK(x.dtype() == at::kFloat && x.dim() == 2 && x.is_contiguous(), "x: contiguous (rows, k) float32");
  const Matrix w{codes, scale, minimum, scale_unit, minimum_unit, bits};
  const int64_t rows = x.size(0), k = x.size(1), n = w.check(k);
  at::Tensor out = at::empty({rows, n}, x.options());
  if (rows == 0) return out;
  w.apply(quantize(x.data_ptr<float>(), rows, k), rows, k, out.data_ptr<float>());
  return out;
}

// A gated MLP in one call: down(act(gate(x)) * up(x)), each matrix given as group_matmul takes it (a list of codes,
// scale, minimum, scale_unit, minimum_unit; `bits` one per matrix). x is quantized once for gate and up; the
// activation's output is quantized like any matmul input. Row-invariant like group_matmul.
at::Tensor group_mlp(const at::Tensor& x, const std::vector<at::Tensor>& gate, const std::vector<at::Tensor>& up,
                     const std::vector<at::Tensor>& down, const std::vector<int64_t>& bits, int64_t activation) {
  TORCH_CHECK(x.dtype() == at::kFloat && x.dim() == 2 && x.is_contiguous(), "x: contiguous (rows, k) float32");
  TORCH_CHECK(bits.size() == 3, "bits: one per matrix (gate, up, down)");
  TORCH_CHECK(activation == kSilu || activation == kGeluTanh, "activation: 0 (silu) or 1 (gelu_tanh)");
  const Matrix g = matrix_of(gate, bits[0]), u = matrix_of(up, bits[1]), d = matrix_of(down, bits[2]);
  const int64_t rows = x.size(0), k = x.size(1), inner = g.check(k);
  TORCH_CHECK(u.check(k) == inner, "gate and up differ in width");
  const int64_t n = d.check(inner);
  at::Tensor out = at::empty({rows, n}, x.options());
  if (rows == 0) return out;
  at::Tensor hidden = at::empty({2, rows, inner}, x.options());
  float* gh = hidden.data_ptr<float>();
  float* uh = gh + rows * inner;
  const Rows q = quantize(x.data_ptr<float>(), rows, k);
  g.apply(q, rows, k, gh);
  u.apply(q, rows, k, uh);
  for (int64_t i = 0; i + kCols <= rows * inner; i += kCols)  // inner is a multiple of 16: whole rows
    store(gh + i, gated(load(gh + i), load(uh + i), activation));
  d.apply(quantize(gh, rows, inner), rows, inner, out.data_ptr<float>());
  return out;
}
