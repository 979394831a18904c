// Shared definitions of the xbn batch-norm kernels: storage/accumulation types, conversions,
// vector loads, Welford/Chan merges and deterministic block reductions.
//
// Compiled with exactly one of -DXBN_DTYPE_F32, -DXBN_DTYPE_F64, -DXBN_DTYPE_F16,
// -DXBN_DTYPE_BF16. No CUDA header is included: NVRTC from the pip wheel ships none, and the
// half/bfloat16 conversions below are one PTX instruction or a few integer operations.
// xbn/kernels/_source.py (kernel_source) inlines this file where a .cu file includes it, so
// NVRTC (CuPy at run time, ci/check_kernels.py) needs no include path; the CPU emulator
// (tests/cuda_host) includes it through -I like any header.

#ifndef XBN_COMMON_CUH
#define XBN_COMMON_CUH

#if defined(XBN_DTYPE_F32)
typedef float xbn_t;   // storage type of x, dy, y, dx
typedef float acc_t;   // accumulation type, and the dtype of every per-channel vector
#define XBN_ITEMSIZE 4
#elif defined(XBN_DTYPE_F64)
typedef double xbn_t;
typedef double acc_t;
#define XBN_ITEMSIZE 8
#elif defined(XBN_DTYPE_F16) || defined(XBN_DTYPE_BF16)
typedef unsigned short xbn_t;  // the raw 16 bits
typedef float acc_t;
#define XBN_ITEMSIZE 2
#else
#error "define one of XBN_DTYPE_F32, XBN_DTYPE_F64, XBN_DTYPE_F16, XBN_DTYPE_BF16"
#endif

// The host (xbn/kernels/_launch.py) never launches more threads per block than this; the static
// shared-memory tiles below are sized by it.
#define XBN_MAX_THREADS 256
// Independent vector loads each thread issues before it uses any of them (memory-level
// parallelism); the host's chunk sizes are planned with the same number.
#define XBN_UNROLL 4
// Partial slots a thread of a split reduction's last block loads before it merges them. The
// planner gives each thread at most XBN_UNROLL slots, so two rounds of loads at most; four at
// once would hold up to 4 * (2W + 1) values and raise the whole kernel's register count past
// its main loop's (fewer blocks resident for a merge that only the last block runs).
#define XBN_MERGE_LOADS 2
// Each kernel is instantiated for W = 1 and for the vector widths of 8 and 16 bytes (W > 1),
// named by W: _v1, _v2, _v4 for float32, _v1, _v2 for float64, _v1, _v4, _v8 for 16-bit types.
// M(SUFFIX, W) defines the entry points of one width. (xbn/kernels/_launch.py: WIDTHS.)
#if XBN_ITEMSIZE == 8
#define XBN_FOR_EACH_WIDTH(M) M(v1, 1) M(v2, 2)
#elif XBN_ITEMSIZE == 4
#define XBN_FOR_EACH_WIDTH(M) M(v1, 1) M(v2, 2) M(v4, 4)
#else
#define XBN_FOR_EACH_WIDTH(M) M(v1, 1) M(v4, 4) M(v8, 8)
#endif

__device__ __forceinline__ acc_t xbn_load_acc(xbn_t v);
__device__ __forceinline__ xbn_t xbn_store_acc(acc_t v);

#if defined(XBN_DTYPE_F16) && defined(XBN_HOST_EMULATION)
// tests/cuda_host compiles these kernels as C++ on the CPU; its header supplies the conversions.
__device__ __forceinline__ float xbn_load_acc(unsigned short h) { return xbn_host_half_to_float(h); }
__device__ __forceinline__ unsigned short xbn_store_acc(float f) { return xbn_host_float_to_half(f); }
#elif defined(XBN_DTYPE_F16)
__device__ __forceinline__ float xbn_load_acc(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ unsigned short xbn_store_acc(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
#elif defined(XBN_DTYPE_BF16)
__device__ __forceinline__ float xbn_load_acc(unsigned short h) {
    return __uint_as_float(((unsigned int)h) << 16);
}
// Round to nearest even, NaN kept quiet: the rounding of __float2bfloat16_rn, without the header.
__device__ __forceinline__ unsigned short xbn_store_acc(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (unsigned short)((u >> 16) | 0x0040u);
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}
#else
__device__ __forceinline__ acc_t xbn_load_acc(xbn_t v) { return v; }
__device__ __forceinline__ xbn_t xbn_store_acc(acc_t v) { return v; }
#endif

// Correctly rounded operations the compiler may not contract into an fma. The per-channel
// epilogues of the fused reductions (bn_stats.cu, bn_backward_reduce.cu) compute the same
// formulas as xbn.functional, whose every array operation rounds once; a contracted
// a * b + c would round once less and drift from the generic path by an ulp here and there.
__device__ __forceinline__ float xbn_mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double xbn_mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float xbn_add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double xbn_add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float xbn_div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double xbn_div_rn(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ float xbn_sqrt_rn(float a) { return __fsqrt_rn(a); }
__device__ __forceinline__ double xbn_sqrt_rn(double a) { return __dsqrt_rn(a); }

// Flags of the fused epilogues (bits of their int argument `flags`; xbn/kernels/_launch.py has
// the same values). Parameters (weight, bias, running statistics) are float32 or float64 as
// the layer's dtype says, independently of the input's dtype: one flag says which.
#define XBN_HAS_WEIGHT 1
#define XBN_HAS_BIAS 2
#define XBN_HAS_RUNNING 4
#define XBN_PARAMS_F64 8

// Element i of a parameter vector of float32 (or float64 with f64), rounded to acc_t as
// xp.astype(weight, acc dtype) rounds it.
__device__ __forceinline__ acc_t xbn_param(const void* p, int i, bool f64) {
    return f64 ? (acc_t) static_cast<const double*>(p)[i] : (acc_t) static_cast<const float*>(p)[i];
}

// W consecutive elements, aligned to their size so one 16-byte (or 2/4/8-byte) access moves them.
template <int W>
struct alignas(sizeof(xbn_t) * W) xbn_vec {
    xbn_t v[W];
};

// Loads of partials written by other blocks: bypass L1, which is not coherent across SMs.
__device__ __forceinline__ float xbn_ld_cg(const float* p) { return __ldcg(p); }
__device__ __forceinline__ double xbn_ld_cg(const double* p) { return __ldcg(p); }
__device__ __forceinline__ int xbn_ld_cg(const int* p) { return __ldcg(p); }

// ---------------------------------------------------------------------------------------------
// Welford / Chan: (count, mean, M2) of a set of values; merging two sets is exact in real
// arithmetic, and never forms E[x^2] - E[x]^2, which cancels in float32 when |mean| >> std.

__device__ __forceinline__ bool xbn_isinf(float v) {
    return (__float_as_uint(v) & 0x7fffffffu) == 0x7f800000u;
}
__device__ __forceinline__ bool xbn_isinf(double v) {
    return (__double_as_longlong(v) & 0x7fffffffffffffffLL) == 0x7ff0000000000000LL;
}
__device__ __forceinline__ bool xbn_isfinite(float v) {
    return (__float_as_uint(v) & 0x7f800000u) != 0x7f800000u;
}
__device__ __forceinline__ bool xbn_isfinite(double v) {
    return (__double_as_longlong(v) & 0x7ff0000000000000LL) != 0x7ff0000000000000LL;
}

// The value a channel's data are shifted by: its first value, unless that is inf or NaN, where
// x - first would turn the channel's other infinities into NaN (inf - inf); 0 then.
__device__ __forceinline__ acc_t xbn_shift_of(acc_t first) {
    return xbn_isfinite(first) ? first : (acc_t)0;
}

// The mean of two merged sets. mean + delta * ratio is NaN as soon as one side is infinite
// (inf - inf in delta, or inf + (-inf) * ratio); a set holding infinities of one sign has that
// infinity as its mean, and of both signs NaN, which mean + mean_b gives (as a sum would, and
// as PyTorch's running_mean shows).
__device__ __forceinline__ acc_t xbn_merged_mean(acc_t mean, acc_t mean_b, acc_t delta,
                                                 acc_t ratio) {
    return (xbn_isinf(mean) || xbn_isinf(mean_b)) ? mean + mean_b : mean + delta * ratio;
}

__device__ __forceinline__ void xbn_chan_merge(acc_t& mean, acc_t& m2, int& n,
                                               acc_t mean_b, acc_t m2_b, int n_b) {
    if (n_b == 0) return;
    if (n == 0) {
        mean = mean_b;
        m2 = m2_b;
        n = n_b;
        return;
    }
    const int total = n + n_b;
    const acc_t ratio = (acc_t)n_b / (acc_t)total;
    const acc_t delta = mean_b - mean;
    mean = xbn_merged_mean(mean, mean_b, delta, ratio);
    m2 += m2_b + delta * delta * (acc_t)n * ratio;
    n = total;
}

// Merge W channels that share one count (same rows), with one division for all of them.
template <int W>
__device__ __forceinline__ void xbn_chan_merge_shared(acc_t (&mean)[W], acc_t (&m2)[W], int& n,
                                                      const acc_t (&mean_b)[W],
                                                      const acc_t (&m2_b)[W], int n_b) {
    if (n_b == 0) return;
    if (n == 0) {
#pragma unroll
        for (int w = 0; w < W; ++w) {
            mean[w] = mean_b[w];
            m2[w] = m2_b[w];
        }
        n = n_b;
        return;
    }
    const int total = n + n_b;
    const acc_t ratio = (acc_t)n_b / (acc_t)total;
    const acc_t cross = (acc_t)n * ratio;
#pragma unroll
    for (int w = 0; w < W; ++w) {
        const acc_t delta = mean_b[w] - mean[w];
        mean[w] = xbn_merged_mean(mean[w], mean_b[w], delta, ratio);
        m2[w] += m2_b[w] + delta * delta * cross;
    }
    n = total;
}

// ---------------------------------------------------------------------------------------------
// Deterministic reductions over a 1-D block (blockDim.x a multiple of 32, at most
// XBN_MAX_THREADS): a fixed shuffle tree per warp, then warp 0 over the warps' results in warp
// order. The result is in thread 0. Every thread of the block must call these (barriers inside).

__device__ __forceinline__ void xbn_warp_welford(acc_t& mean, acc_t& m2, int& n) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        const acc_t mean_b = __shfl_down_sync(0xffffffffu, mean, offset);
        const acc_t m2_b = __shfl_down_sync(0xffffffffu, m2, offset);
        const int n_b = __shfl_down_sync(0xffffffffu, n, offset);
        xbn_chan_merge(mean, m2, n, mean_b, m2_b, n_b);
    }
}

__device__ __forceinline__ void xbn_block_welford(acc_t& mean, acc_t& m2, int& n) {
    __shared__ acc_t s_mean[XBN_MAX_THREADS / 32];
    __shared__ acc_t s_m2[XBN_MAX_THREADS / 32];
    __shared__ int s_n[XBN_MAX_THREADS / 32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    xbn_warp_welford(mean, m2, n);
    __syncthreads();  // a previous call may still be reading the tiles
    if (lane == 0) {
        s_mean[warp] = mean;
        s_m2[warp] = m2;
        s_n[warp] = n;
    }
    __syncthreads();
    if (warp == 0) {
        if (lane < warps) {
            mean = s_mean[lane];
            m2 = s_m2[lane];
            n = s_n[lane];
        } else {
            mean = 0;
            m2 = 0;
            n = 0;
        }
        xbn_warp_welford(mean, m2, n);
    }
}

__device__ __forceinline__ void xbn_warp_sum2(acc_t& a, acc_t& b) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        a += __shfl_down_sync(0xffffffffu, a, offset);
        b += __shfl_down_sync(0xffffffffu, b, offset);
    }
}

__device__ __forceinline__ void xbn_block_sum2(acc_t& a, acc_t& b) {
    __shared__ acc_t s_a[XBN_MAX_THREADS / 32];
    __shared__ acc_t s_b[XBN_MAX_THREADS / 32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    xbn_warp_sum2(a, b);
    __syncthreads();
    if (lane == 0) {
        s_a[warp] = a;
        s_b[warp] = b;
    }
    __syncthreads();
    if (warp == 0) {
        a = lane < warps ? s_a[lane] : (acc_t)0;
        b = lane < warps ? s_b[lane] : (acc_t)0;
        xbn_warp_sum2(a, b);
    }
}

// ---------------------------------------------------------------------------------------------
// The semaphore of the two-stage grid reduction. Every thread that wrote partials has fenced
// them; this returns, in every thread of the block, whether this block was the last of the
// `blocks` blocks that share `*counter` to arrive. The ticket is atomicInc's, which wraps at
// blocks - 1: the last block's own ticket puts the counter back to 0. No separate reset has to
// run later, so nothing (an exception between two launches, a captured graph that replays the
// kernel without any host code around it) can leave a counter that the next launch misreads.

__device__ __forceinline__ bool xbn_arrive_last(unsigned int* counter, unsigned int blocks) {
    __shared__ bool s_last;
    __syncthreads();  // every writer's partials and fence happen before the ticket
    if (threadIdx.x == 0 && threadIdx.y == 0) {
        const unsigned int ticket = atomicInc(counter, blocks - 1u);
        s_last = (ticket == blocks - 1u);
        __threadfence();  // acquire side: the partials read next are the ones fenced above
    }
    __syncthreads();
    return s_last;
}

// ---------------------------------------------------------------------------------------------
// Walk of the channel-major layout (N, C, S) in vector units: a channel's values are numbered
// m = n * Sv + s (Sv = S / W vectors per plane), its vector m lives at n * C * Sv + c * Sv + s.
// A thread visits m, m + step, m + 2 step, ... and keeps (n, s) by carrying instead of dividing.

struct xbn_ncl_walk {
    int n;
    int s;
    int step_n;
    int step_s;
    int sv;

    __device__ __forceinline__ xbn_ncl_walk(int m, int step, int sv_) : sv(sv_) {
        n = m / sv;
        s = m - n * sv;
        step_n = step / sv;
        step_s = step - step_n * sv;
    }
    __device__ __forceinline__ int offset(int csv) const { return n * csv + s; }
    __device__ __forceinline__ void advance() {
        n += step_n;
        s += step_s;
        if (s >= sv) {
            s -= sv;
            n += 1;
        }
    }
};

#endif  // XBN_COMMON_CUH
