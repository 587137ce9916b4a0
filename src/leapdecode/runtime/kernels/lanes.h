// 16-lane float32 and int32 vectors (GCC/Clang vector extensions: AVX-512 registers where the machine has them,
// pairs of AVX2 registers or scalar code elsewhere), shared by the runtime's kernels.
#pragma once

#include <cstdint>

namespace leapdecode {

constexpr int64_t kLanes = 16;
typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));  // unaligned loads and stores
typedef int32_t i16 __attribute__((vector_size(64)));

inline v16 load(const float* p) { return *reinterpret_cast<const v16u*>(p); }
inline void store(float* p, v16 x) { *reinterpret_cast<v16u*>(p) = x; }
inline v16 splat(float x) { return v16{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }

}  // namespace leapdecode
