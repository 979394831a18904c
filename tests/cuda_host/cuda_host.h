// Just enough of CUDA to run xbn's kernels as C++ on the CPU, for tests on machines without a
// GPU. Every CUDA thread of a block is a fiber (ucontext); a fiber runs until it reaches a
// barrier, and the fibers that may run are resumed in an order shuffled by the launch's seed,
// so code that reads shared memory without the barrier it needs gives seed-dependent results.
// Blocks run one after another, also in a shuffled order, so the grid reductions' "last block"
// is a different block on every seed.
//
// What it checks besides the results (the tests build it with -fsanitize=address,undefined, so
// out-of-bounds accesses and 32-bit index overflow abort the run):
//   * __syncthreads() reached by some threads of a block after others have returned: reported
//     as a divergent barrier (CUDA requires every thread to reach every barrier);
//   * __shfl_down_sync(0xffffffff, ...) with lanes that returned or wait elsewhere, or in a
//     block that is not a whole number of warps;
//   * threads waiting at different barriers forever: reported as a deadlock.
// Shared memory lives in function-local statics: one copy per kernel, as on the GPU.

#ifndef XBN_CUDA_HOST_H
#define XBN_CUDA_HOST_H

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>

#define XBN_HOST_EMULATION 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct xbn_dim3 {
    unsigned int x = 0, y = 0, z = 0;
};

extern xbn_dim3 threadIdx, blockIdx, blockDim, gridDim;

using std::fma;

template <class T>
inline T min(T a, T b) { return a < b ? a : b; }

inline float __uint_as_float(unsigned int u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}
inline unsigned int __float_as_uint(float f) {
    unsigned int u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}
inline long long __double_as_longlong(double d) {
    long long u;
    std::memcpy(&u, &d, sizeof u);
    return u;
}

inline float xbn_host_half_to_float(unsigned short h) {
    _Float16 f;
    std::memcpy(&f, &h, sizeof h);
    return (float)f;
}
inline unsigned short xbn_host_float_to_half(float f) {
    _Float16 h = (_Float16)f;  // round to nearest even, as cvt.rn.f16.f32
    unsigned short u;
    std::memcpy(&u, &h, sizeof u);
    return u;
}

template <class T>
inline T __ldcg(const T* p) { return *p; }

// Correctly rounded single operations. Plain C++ arithmetic is that already: the harness is
// built without -ffast-math, in ISO C++ mode (-ffp-contract=off), so nothing becomes an fma.
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline double __dsqrt_rn(double a) { return std::sqrt(a); }

inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

inline unsigned int atomicAdd(unsigned int* p, unsigned int v) {
    const unsigned int old = *p;
    *p = old + v;
    return old;
}

// CUDA's semantics: ((old >= limit) ? 0 : old + 1) is stored, old returned.
inline unsigned int atomicInc(unsigned int* p, unsigned int limit) {
    const unsigned int old = *p;
    *p = old >= limit ? 0u : old + 1u;
    return old;
}

void xbn_host_error(const char* fmt, ...);
void __syncthreads();
// Warp-level exchange: deposit 8 bytes, wait for the whole warp, read lane `src`'s deposit.
unsigned long long xbn_host_warp_exchange(unsigned long long bits, int src_lane);

template <class T>
inline T __shfl_down_sync(unsigned int mask, T v, int offset) {
    static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
    if (mask != 0xffffffffu) xbn_host_error("__shfl_down_sync: only full masks are emulated");
    const int lane = (int)((threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)) & 31);
    unsigned long long bits = 0;
    std::memcpy(&bits, &v, sizeof v);
    const int src = lane + offset;
    const unsigned long long got = xbn_host_warp_exchange(bits, src < 32 ? src : lane);
    T out;
    std::memcpy(&out, &got, sizeof out);
    return out;
}

// Run body() as a grid of (gx, gy) blocks of (bx, by) threads; blocks and ready threads in an
// order shuffled by `seed` (seed 0: in order). Returns the number of problems reported.
int xbn_host_launch(unsigned gx, unsigned gy, unsigned bx, unsigned by, unsigned seed,
                    const std::function<void()>& body);

#endif  // XBN_CUDA_HOST_H
