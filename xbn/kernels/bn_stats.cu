// Forward statistics: per-channel mean and biased variance, Welford within a thread, Chan's
// merge across threads, blocks and the grid. Deterministic: every block owns a fixed slice of
// its channel, and the last block to finish merges the per-block partials in slice order, so
// the same input gives bitwise the same statistics whichever block happens to finish last.
// The values are shifted by their channel's first value before they are accumulated (as
// xbn.functional.batch_stats does): a constant channel then has exactly its value as mean and
// exactly 0 as variance, and a large common offset costs the statistics no digits.
//
// Entry points (_v1: scalar loads; _v2/_v4/_v8: W-element vectors of 8 or 16 bytes):
//   xbn_stats_ncl_v*        channel-major (N, C, S); grid (C, parts), block (threads, 1, 1)
//   xbn_stats_nlc_v*        channels-last (R, C); grid (ceil(C / W / TX), parts), block (TX, TY)
//   xbn_stats_fused_ncl_v*  the same launches, and the thread that finishes a channel goes on
//   xbn_stats_fused_nlc_v*  with the per-channel work of a training forward (xbn_forward_out):
//                           invstd, the (scale, shift) of y = x * scale + shift, and the new
//                           running statistics, so a forward is this launch and scale_shift.
// Workspace (only when parts > 1): partial means, M2 and counts, C * parts each, and one
// zeroed unsigned counter per channel (ncl) or per column of blocks (nlc), which wraps back to
// zero by itself.

#include "xbn_common.cuh"

// Slots a channels-last last-block thread loads before merging them (why one: xbn_stats_nlc).
#define XBN_NLC_MERGE_LOADS 1

// Statistics of the first k of XBN_UNROLL loaded vectors, shifted by `first`, merged into
// (mean, m2, n).
template <int W>
__device__ __forceinline__ void xbn_welford_group(const xbn_vec<W> (&buf)[XBN_UNROLL], int k,
                                                  acc_t first, acc_t& mean, acc_t& m2, int& n) {
    acc_t sum = 0;
#pragma unroll
    for (int u = 0; u < XBN_UNROLL; ++u) {
        if (u < k) {
#pragma unroll
            for (int w = 0; w < W; ++w) sum += xbn_load_acc(buf[u].v[w]) - first;
        }
    }
    const int gn = k * W;
    const acc_t gmean = sum / (acc_t)gn;
    // Deviations from the group's mean in x's own terms: the converted values need not stay
    // live between the two loops (16-bit inputs would double their registers), and a constant
    // group still gives exactly 0 (gmean is 0, centre is first).
    const acc_t centre = first + gmean;
    acc_t gm2 = 0;
#pragma unroll
    for (int u = 0; u < XBN_UNROLL; ++u) {
        if (u < k) {
#pragma unroll
            for (int w = 0; w < W; ++w) {
                const acc_t d = xbn_load_acc(buf[u].v[w]) - centre;
                gm2 += d * d;
            }
        }
    }
    xbn_chan_merge(mean, m2, n, gmean, gm2, gn);
}

// What the thread that finishes channel c does with its statistics (mean, M2 over n values):
// the plain kernels store mean and biased variance.
struct xbn_stats_out {
    acc_t* mean;
    acc_t* var;

    __device__ __forceinline__ void operator()(int c, acc_t mu, acc_t m2, int n) const {
        mean[c] = mu;
        var[c] = m2 / (acc_t)n;
    }
};

// new = (1 - m) * running + m * batch in the parameters' dtype P, each operation rounded as
// the generic path's array operations round (xbn.functional.updated_running_stats).
template <class P>
__device__ __forceinline__ void xbn_running_update(const void* running_mean,
                                                   const void* running_var,
                                                   void* new_running_mean, void* new_running_var,
                                                   int c, double keep, double momentum, acc_t mu,
                                                   acc_t unbiased) {
    const P k = (P)keep;
    const P m = (P)momentum;
    static_cast<P*>(new_running_mean)[c] =
        xbn_add_rn(xbn_mul_rn(k, static_cast<const P*>(running_mean)[c]), xbn_mul_rn(m, (P)mu));
    static_cast<P*>(new_running_var)[c] =
        xbn_add_rn(xbn_mul_rn(k, static_cast<const P*>(running_var)[c]), xbn_mul_rn(m, (P)unbiased));
}

// The fused kernels' finish: the per-channel work of xbn.functional.batch_norm_forward, formula
// for formula (invstd, scale_shift_coefficients with var=, updated_running_stats), so that
// results match the generic composition's to the rounding of the statistics themselves.
// Outputs are new arrays; the running statistics are read, never written in place.
struct xbn_forward_out {
    acc_t* mean;
    acc_t* inv;
    acc_t* scale;
    acc_t* shift;
    const void* weight;
    const void* bias;
    const void* running_mean;
    const void* running_var;
    void* new_running_mean;
    void* new_running_var;
    double eps;
    double keep;      // 1 - momentum, as the host computed it
    double momentum;
    double unbias;    // M / (M - 1)
    int flags;        // XBN_HAS_WEIGHT | XBN_HAS_BIAS | XBN_HAS_RUNNING | XBN_PARAMS_F64

    __device__ __forceinline__ void operator()(int c, acc_t mu, acc_t m2, int n) const {
        const bool f64 = (flags & XBN_PARAMS_F64) != 0;
        const acc_t var = m2 / (acc_t)n;
        // 1 / sqrt(var + eps), each step correctly rounded (rsqrt's error is larger).
        const acc_t iv = xbn_div_rn((acc_t)1, xbn_sqrt_rn(xbn_add_rn(var, (acc_t)eps)));
        acc_t a = (flags & XBN_HAS_WEIGHT) ? xbn_mul_rn(iv, xbn_param(weight, c, f64)) : iv;
        // A constant channel (var == 0 exactly) gets scale 0: y is then exactly the bias.
        if (var == (acc_t)0) a = (acc_t)0;
        acc_t b = xbn_mul_rn(-mu, a);
        if (flags & XBN_HAS_BIAS) b = xbn_add_rn(b, xbn_param(bias, c, f64));
        mean[c] = mu;
        inv[c] = iv;
        scale[c] = a;
        shift[c] = b;
        if (flags & XBN_HAS_RUNNING) {
            const acc_t unbiased = xbn_mul_rn(var, (acc_t)unbias);
            if (f64) {
                xbn_running_update<double>(running_mean, running_var, new_running_mean,
                                           new_running_var, c, keep, momentum, mu, unbiased);
            } else {
                xbn_running_update<float>(running_mean, running_var, new_running_mean,
                                          new_running_var, c, keep, momentum, mu, unbiased);
            }
        }
    }
};

template <int W, class Out>
__device__ __forceinline__ void xbn_stats_ncl(const xbn_t* __restrict__ x,
                                              acc_t* __restrict__ ws_mean,
                                              acc_t* __restrict__ ws_m2,
                                              int* __restrict__ ws_n,
                                              unsigned int* __restrict__ counters,
                                              int n_outer, int channels, int sv, int chunk,
                                              const Out& out) {
    const int c = blockIdx.x;
    const int part = blockIdx.y;
    const int parts = gridDim.y;
    const int mv = n_outer * sv;
    const int begin = part * chunk;
    const int end = min(begin + chunk, mv);
    const int csv = channels * sv;
    const xbn_vec<W>* xc = reinterpret_cast<const xbn_vec<W>*>(x) + c * sv;
    // the channel's value at n = 0, s = 0
    const acc_t first = xbn_shift_of(xbn_load_acc(x[c * sv * W]));

    acc_t mean = 0, m2 = 0;
    int n = 0;
    int m = begin + (int)threadIdx.x;
    xbn_ncl_walk walk(m, (int)blockDim.x, sv);
    while (m < end) {
        xbn_vec<W> buf[XBN_UNROLL];
        int k = 0;
#pragma unroll
        for (int u = 0; u < XBN_UNROLL; ++u) {
            if (m < end) {
                buf[u] = xc[walk.offset(csv)];
                k = u + 1;
            }
            m += (int)blockDim.x;
            walk.advance();
        }
        xbn_welford_group<W>(buf, k, first, mean, m2, n);
    }

    xbn_block_welford(mean, m2, n);
    if (parts > 1) {
        if (threadIdx.x == 0) {
            const int slot = c * parts + part;
            ws_mean[slot] = mean;
            ws_m2[slot] = m2;
            ws_n[slot] = n;
            __threadfence();
        }
        if (!xbn_arrive_last(counters + c, (unsigned int)parts)) return;

        // The last block: each thread's slots in slice order, then the fixed block tree. The
        // loads of XBN_MERGE_LOADS slots are issued before the first of their merges, and the
        // planner keeps parts <= XBN_UNROLL * blockDim.x: two round trips to L2 at most, not
        // one per slot.
        mean = 0;
        m2 = 0;
        n = 0;
        for (int i = (int)threadIdx.x; i < parts; i += XBN_MERGE_LOADS * (int)blockDim.x) {
            acc_t mean_b[XBN_MERGE_LOADS], m2_b[XBN_MERGE_LOADS];
            int n_b[XBN_MERGE_LOADS];
#pragma unroll
            for (int u = 0; u < XBN_MERGE_LOADS; ++u) {
                const int j = i + u * (int)blockDim.x;
                mean_b[u] = 0;
                m2_b[u] = 0;
                n_b[u] = 0;
                if (j < parts) {
                    const int slot = c * parts + j;
                    mean_b[u] = xbn_ld_cg(ws_mean + slot);
                    m2_b[u] = xbn_ld_cg(ws_m2 + slot);
                    n_b[u] = xbn_ld_cg(ws_n + slot);
                }
            }
#pragma unroll
            for (int u = 0; u < XBN_MERGE_LOADS; ++u) {
                xbn_chan_merge(mean, m2, n, mean_b[u], m2_b[u], n_b[u]);
            }
        }
        xbn_block_welford(mean, m2, n);
    }
    if (threadIdx.x == 0) out(c, first + mean, m2, n);
}

// Merge the (TX, TY) threads' states down the y axis of the block, in a fixed tree: the result
// for column tx is in the thread (tx, 0). TY is a power of two. Every thread must call it.
template <int W>
__device__ __forceinline__ void xbn_column_welford(acc_t (&mean)[W], acc_t (&m2)[W], int& n) {
    __shared__ acc_t s_mean[XBN_MAX_THREADS * W];
    __shared__ acc_t s_m2[XBN_MAX_THREADS * W];
    __shared__ int s_n[XBN_MAX_THREADS];
    const int tid = (int)(threadIdx.y * blockDim.x + threadIdx.x);
    for (int half = (int)blockDim.y >> 1; half > 0; half >>= 1) {
        __syncthreads();  // the previous level (or a previous call) is done reading
        if ((int)threadIdx.y >= half && (int)threadIdx.y < 2 * half) {
#pragma unroll
            for (int w = 0; w < W; ++w) {
                s_mean[tid * W + w] = mean[w];
                s_m2[tid * W + w] = m2[w];
            }
            s_n[tid] = n;
        }
        __syncthreads();
        if ((int)threadIdx.y < half) {
            const int other = tid + half * (int)blockDim.x;
            acc_t mean_b[W], m2_b[W];
#pragma unroll
            for (int w = 0; w < W; ++w) {
                mean_b[w] = s_mean[other * W + w];
                m2_b[w] = s_m2[other * W + w];
            }
            xbn_chan_merge_shared<W>(mean, m2, n, mean_b, m2_b, s_n[other]);
        }
    }
}

template <int W, class Out>
__device__ __forceinline__ void xbn_stats_nlc(const xbn_t* __restrict__ x,
                                              acc_t* __restrict__ ws_mean,
                                              acc_t* __restrict__ ws_m2,
                                              int* __restrict__ ws_n,
                                              unsigned int* __restrict__ counters,
                                              int rows, int cvs, int chunk_rows, const Out& out) {
    const int cv = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    const bool active = cv < cvs;
    const int part = blockIdx.y;
    const int parts = gridDim.y;
    const int r_begin = part * chunk_rows;
    const int r_end = min(r_begin + chunk_rows, rows);
    const int ty = (int)threadIdx.y;
    const int tys = (int)blockDim.y;
    const xbn_vec<W>* xv = reinterpret_cast<const xbn_vec<W>*>(x);

    acc_t mean[W], m2[W], first[W];
#pragma unroll
    for (int w = 0; w < W; ++w) {
        mean[w] = 0;
        m2[w] = 0;
        first[w] = 0;
    }
    if (active) {
        const xbn_vec<W> row0 = xv[cv];  // the W channels' values in row 0
#pragma unroll
        for (int w = 0; w < W; ++w) first[w] = xbn_shift_of(xbn_load_acc(row0.v[w]));
    }
    int n = 0;
    if (active) {
        for (int r = r_begin + ty; r < r_end; r += XBN_UNROLL * tys) {
            xbn_vec<W> buf[XBN_UNROLL];
            int k = 0;
#pragma unroll
            for (int u = 0; u < XBN_UNROLL; ++u) {
                const int rr = r + u * tys;
                if (rr < r_end) {
                    buf[u] = xv[rr * cvs + cv];
                    k = u + 1;
                }
            }
            // Each channel's group statistics merged right away (xbn_chan_merge_shared's
            // arithmetic, one channel at a time): no W-wide temporaries stay live.
            const acc_t inv_k = (acc_t)1 / (acc_t)k;
            const int total = n + k;
            const acc_t ratio = (acc_t)k / (acc_t)total;
            const acc_t cross = (acc_t)n * ratio;
#pragma unroll
            for (int w = 0; w < W; ++w) {
                acc_t sum = 0;
#pragma unroll
                for (int u = 0; u < XBN_UNROLL; ++u) {
                    if (u < k) sum += xbn_load_acc(buf[u].v[w]) - first[w];
                }
                const acc_t gmean = sum * inv_k;
                const acc_t centre = first[w] + gmean;  // as in xbn_welford_group
                acc_t gm2 = 0;
#pragma unroll
                for (int u = 0; u < XBN_UNROLL; ++u) {
                    if (u < k) {
                        const acc_t d = xbn_load_acc(buf[u].v[w]) - centre;
                        gm2 += d * d;
                    }
                }
                if (n == 0) {
                    mean[w] = gmean;
                    m2[w] = gm2;
                } else {
                    const acc_t delta = gmean - mean[w];
                    mean[w] = xbn_merged_mean(mean[w], gmean, delta, ratio);
                    m2[w] += gm2 + delta * delta * cross;
                }
            }
            n = total;
        }
    }

    xbn_column_welford<W>(mean, m2, n);
    if (parts > 1) {
        if (ty == 0 && active) {
            const int slot = part * cvs + cv;
#pragma unroll
            for (int w = 0; w < W; ++w) {
                ws_mean[slot * W + w] = mean[w];
                ws_m2[slot * W + w] = m2[w];
            }
            ws_n[slot] = n;
            __threadfence();
        }
        if (!xbn_arrive_last(counters + blockIdx.x, (unsigned int)parts)) return;

        // Each thread's slots in slice order, then the fixed column tree. A slot's 2W + 1 loads
        // are issued together; slots one after another (at most XBN_UNROLL a thread, parts <=
        // XBN_UNROLL * TY by the planner): hoisting two slots' would hold 4W + 2 values and
        // cost the whole kernel residency (with W = 8, 103 registers instead of 80).
#pragma unroll
        for (int w = 0; w < W; ++w) {
            mean[w] = 0;
            m2[w] = 0;
        }
        n = 0;
        const int merged = active ? parts : 0;
        for (int i = ty; i < merged; i += XBN_NLC_MERGE_LOADS * tys) {
            acc_t mean_b[XBN_NLC_MERGE_LOADS][W], m2_b[XBN_NLC_MERGE_LOADS][W];
            int n_b[XBN_NLC_MERGE_LOADS];
#pragma unroll
            for (int u = 0; u < XBN_NLC_MERGE_LOADS; ++u) {
                const int j = i + u * tys;
                const int slot = j * cvs + cv;
                n_b[u] = j < parts ? xbn_ld_cg(ws_n + slot) : 0;
#pragma unroll
                for (int w = 0; w < W; ++w) {
                    mean_b[u][w] = j < parts ? xbn_ld_cg(ws_mean + slot * W + w) : (acc_t)0;
                    m2_b[u][w] = j < parts ? xbn_ld_cg(ws_m2 + slot * W + w) : (acc_t)0;
                }
            }
#pragma unroll
            for (int u = 0; u < XBN_NLC_MERGE_LOADS; ++u) {
                xbn_chan_merge_shared<W>(mean, m2, n, mean_b[u], m2_b[u], n_b[u]);
            }
        }
        xbn_column_welford<W>(mean, m2, n);
    }
    if (ty == 0 && active) {
#pragma unroll
        for (int w = 0; w < W; ++w) out(cv * W + w, first[w] + mean[w], m2[w], n);
    }
}

#define XBN_FORWARD_OUT                                                                        \
    xbn_forward_out {                                                                          \
        mean, inv, scale, shift, weight, bias, running_mean, running_var, new_running_mean,    \
            new_running_var, eps, keep, momentum, unbias, flags                                \
    }

#define XBN_STATS_ENTRIES(SUFFIX, W)                                                           \
    extern "C" __global__ void __launch_bounds__(XBN_MAX_THREADS) xbn_stats_ncl_##SUFFIX(     \
        const xbn_t* __restrict__ x, acc_t* __restrict__ mean_out,                             \
        acc_t* __restrict__ var_out, acc_t* __restrict__ ws_mean, acc_t* __restrict__ ws_m2,   \
        int* __restrict__ ws_n, unsigned int* __restrict__ counters, int n_outer,              \
        int channels, int sv, int chunk) {                                                     \
        xbn_stats_ncl<W>(x, ws_mean, ws_m2, ws_n, counters, n_outer, channels, sv, chunk,      \
                         xbn_stats_out{mean_out, var_out});                                    \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(XBN_MAX_THREADS) xbn_stats_nlc_##SUFFIX(     \
        const xbn_t* __restrict__ x, acc_t* __restrict__ mean_out,                             \
        acc_t* __restrict__ var_out, acc_t* __restrict__ ws_mean, acc_t* __restrict__ ws_m2,   \
        int* __restrict__ ws_n, unsigned int* __restrict__ counters, int rows, int cvs,        \
        int chunk_rows) {                                                                      \
        xbn_stats_nlc<W>(x, ws_mean, ws_m2, ws_n, counters, rows, cvs, chunk_rows,             \
                         xbn_stats_out{mean_out, var_out});                                    \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(XBN_MAX_THREADS) xbn_stats_fused_ncl_##SUFFIX( \
        const xbn_t* __restrict__ x, acc_t* __restrict__ mean, acc_t* __restrict__ inv,        \
        acc_t* __restrict__ scale, acc_t* __restrict__ shift, const void* __restrict__ weight, \
        const void* __restrict__ bias, const void* __restrict__ running_mean,                  \
        const void* __restrict__ running_var, void* __restrict__ new_running_mean,             \
        void* __restrict__ new_running_var, acc_t* __restrict__ ws_mean,                       \
        acc_t* __restrict__ ws_m2, int* __restrict__ ws_n, unsigned int* __restrict__ counters, \
        double eps, double keep, double momentum, double unbias, int flags, int n_outer,       \
        int channels, int sv, int chunk) {                                                     \
        xbn_stats_ncl<W>(x, ws_mean, ws_m2, ws_n, counters, n_outer, channels, sv, chunk,      \
                         XBN_FORWARD_OUT);                                                     \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(XBN_MAX_THREADS) xbn_stats_fused_nlc_##SUFFIX( \
        const xbn_t* __restrict__ x, acc_t* __restrict__ mean, acc_t* __restrict__ inv,        \
        acc_t* __restrict__ scale, acc_t* __restrict__ shift, const void* __restrict__ weight, \
        const void* __restrict__ bias, const void* __restrict__ running_mean,                  \
        const void* __restrict__ running_var, void* __restrict__ new_running_mean,             \
        void* __restrict__ new_running_var, acc_t* __restrict__ ws_mean,                       \
        acc_t* __restrict__ ws_m2, int* __restrict__ ws_n, unsigned int* __restrict__ counters, \
        double eps, double keep, double momentum, double unbias, int flags, int rows, int cvs, \
        int chunk_rows) {                                                                      \
        xbn_stats_nlc<W>(x, ws_mean, ws_m2, ws_n, counters, rows, cvs, chunk_rows,             \
                         XBN_FORWARD_OUT);                                                     \
    }

XBN_FOR_EACH_WIDTH(XBN_STATS_ENTRIES)
