// Backward reduction: per channel sum(dy) and sum(dy * (x - mean)), accumulated in acc_t
// (float32 for float32/float16/bfloat16 input, float64 for float64). No floating-point atomics:
// each block writes its two partial sums to a workspace slot of its own, and the last block to
// finish (threadfence + counter) adds the slots up in slot order, so results are bitwise
// reproducible run after run.
//
// Entry points (_v1: scalar loads; _v2/_v4/_v8: W-element vectors of 8 or 16 bytes):
//   xbn_backward_reduce_ncl_v*        (N, C, S); grid (C, parts), block (threads, 1, 1)
//   xbn_backward_reduce_nlc_v*        (R, C);    grid (ceil(C / W / TX), parts), block (TX, TY)
//   xbn_backward_reduce_fused_ncl_v*  the same launches, and the thread that finishes a channel
//   xbn_backward_reduce_fused_nlc_v*  goes on with the per-channel work of the backward
//                                     (xbn_backward_out): dgamma, dbeta and the coefficients
//                                     of dx, so a backward is this launch and backward_apply.

#include "xbn_common.cuh"

// What the thread that finishes channel c does with its sums: the plain kernels store them.
struct xbn_reduce_out {
    acc_t* sum_dy;
    acc_t* sum_dy_xmu;

    __device__ __forceinline__ void operator()(int c, acc_t s_dy, acc_t s_dy_xmu) const {
        sum_dy[c] = s_dy;
        sum_dy_xmu[c] = s_dy_xmu;
    }
};

// The fused kernels' finish: xbn.functional.batch_norm_backward's per-channel work, formula for
// formula (backward_coefficients; dgamma = sum_dy_xmu * inv, dbeta = sum_dy), so that results
// match the generic composition's to the rounding of the sums themselves. With dx = dy * k_dy +
// (x - mean) * k_xmu + k_const (backward_apply), or dx = dy * k_dy when the statistics were
// running ones (eval mode: k_xmu and k_const are then written but not used).
struct xbn_backward_out {
    const acc_t* inv;
    const void* weight;
    acc_t* dgamma;
    acc_t* dbeta;
    acc_t* k_dy;
    acc_t* k_xmu;
    acc_t* k_const;
    int flags;    // XBN_HAS_WEIGHT | XBN_PARAMS_F64
    int count;    // M, values per channel

    __device__ __forceinline__ void operator()(int c, acc_t s_dy, acc_t s_dy_xmu) const {
        const acc_t iv = inv[c];
        const acc_t m = (acc_t)count;
        const acc_t a = (flags & XBN_HAS_WEIGHT)
                            ? xbn_mul_rn(iv, xbn_param(weight, c, (flags & XBN_PARAMS_F64) != 0))
                            : iv;
        dgamma[c] = xbn_mul_rn(s_dy_xmu, iv);
        dbeta[c] = s_dy;
        k_dy[c] = a;
        // -k_dy * (inv * (inv * (sum_dy_xmu / M))), from the inside out: with a tiny eps a
        // constant channel has a huge inv and sum_dy_xmu == 0, and (-k_dy * inv) * inv would
        // overflow to inf before the product with 0 (NaN); then -k_dy * sum_dy / M, left to right
        k_xmu[c] = xbn_mul_rn(-a, xbn_mul_rn(iv, xbn_mul_rn(iv, xbn_div_rn(s_dy_xmu, m))));
        k_const[c] = xbn_div_rn(xbn_mul_rn(-a, s_dy), m);
    }
};

template <int W, class Out>
__device__ __forceinline__ void xbn_backward_reduce_ncl(
    const xbn_t* __restrict__ dy, const xbn_t* __restrict__ x, const acc_t* __restrict__ mean,
    acc_t* __restrict__ ws_dy, acc_t* __restrict__ ws_dy_xmu, unsigned int* __restrict__ counters,
    int n_outer, int channels, int sv, int chunk, const Out& out) {
    const int c = blockIdx.x;
    const int part = blockIdx.y;
    const int parts = gridDim.y;
    const int mv = n_outer * sv;
    const int begin = part * chunk;
    const int end = min(begin + chunk, mv);
    const int csv = channels * sv;
    const xbn_vec<W>* dyc = reinterpret_cast<const xbn_vec<W>*>(dy) + c * sv;
    const xbn_vec<W>* xc = reinterpret_cast<const xbn_vec<W>*>(x) + c * sv;
    const acc_t mu = mean[c];

    acc_t s_dy = 0, s_dy_xmu = 0;
    int m = begin + (int)threadIdx.x;
    xbn_ncl_walk walk(m, (int)blockDim.x, sv);
    while (m < end) {
        xbn_vec<W> bdy[XBN_UNROLL], bx[XBN_UNROLL];
        int k = 0;
#pragma unroll
        for (int u = 0; u < XBN_UNROLL; ++u) {
            if (m < end) {
                const int off = walk.offset(csv);
                bdy[u] = dyc[off];
                bx[u] = xc[off];
                k = u + 1;
            }
            m += (int)blockDim.x;
            walk.advance();
        }
#pragma unroll
        for (int u = 0; u < XBN_UNROLL; ++u) {
            if (u < k) {
#pragma unroll
                for (int w = 0; w < W; ++w) {
                    const acc_t g = xbn_load_acc(bdy[u].v[w]);
                    s_dy += g;
                    s_dy_xmu += g * (xbn_load_acc(bx[u].v[w]) - mu);
                }
            }
        }
    }

    xbn_block_sum2(s_dy, s_dy_xmu);
    if (parts > 1) {
        if (threadIdx.x == 0) {
            ws_dy[c * parts + part] = s_dy;
            ws_dy_xmu[c * parts + part] = s_dy_xmu;
            __threadfence();
        }
        if (!xbn_arrive_last(counters + c, (unsigned int)parts)) return;

        // Each thread's slots in slot order, XBN_MERGE_LOADS slots loaded before the first of
        // their adds (parts <= XBN_UNROLL * blockDim.x by the planner: two round trips at most).
        s_dy = 0;
        s_dy_xmu = 0;
        for (int i = (int)threadIdx.x; i < parts; i += XBN_MERGE_LOADS * (int)blockDim.x) {
            acc_t a[XBN_MERGE_LOADS], b[XBN_MERGE_LOADS];
#pragma unroll
            for (int u = 0; u < XBN_MERGE_LOADS; ++u) {
                const int j = i + u * (int)blockDim.x;
                a[u] = j < parts ? xbn_ld_cg(ws_dy + c * parts + j) : (acc_t)0;
                b[u] = j < parts ? xbn_ld_cg(ws_dy_xmu + c * parts + j) : (acc_t)0;
            }
#pragma unroll
            for (int u = 0; u < XBN_MERGE_LOADS; ++u) {
                if (i + u * (int)blockDim.x < parts) {
                    s_dy += a[u];
                    s_dy_xmu += b[u];
                }
            }
        }
        xbn_block_sum2(s_dy, s_dy_xmu);
    }
    if (threadIdx.x == 0) out(c, s_dy, s_dy_xmu);
}

// Sum the (TX, TY) threads' W-channel pairs down the y axis in a fixed tree; the result for
// column tx is in thread (tx, 0). TY is a power of two. Every thread must call it.
template <int W>
__device__ __forceinline__ void xbn_column_sum2(acc_t (&a)[W], acc_t (&b)[W]) {
    __shared__ acc_t s_a[XBN_MAX_THREADS * W];
    __shared__ acc_t s_b[XBN_MAX_THREADS * W];
    const int tid = (int)(threadIdx.y * blockDim.x + threadIdx.x);
    for (int half = (int)blockDim.y >> 1; half > 0; half >>= 1) {
        __syncthreads();
        if ((int)threadIdx.y >= half && (int)threadIdx.y < 2 * half) {
#pragma unroll
            for (int w = 0; w < W; ++w) {
                s_a[tid * W + w] = a[w];
                s_b[tid * W + w] = b[w];
            }
        }
        __syncthreads();
        if ((int)threadIdx.y < half) {
            const int other = tid + half * (int)blockDim.x;
#pragma unroll
            for (int w = 0; w < W; ++w) {
                a[w] += s_a[other * W + w];
                b[w] += s_b[other * W + w];
            }
        }
    }
}

template <int W, class Out>
__device__ __forceinline__ void xbn_backward_reduce_nlc(
    const xbn_t* __restrict__ dy, const xbn_t* __restrict__ x, const acc_t* __restrict__ mean,
    acc_t* __restrict__ ws_dy, acc_t* __restrict__ ws_dy_xmu, unsigned int* __restrict__ counters,
    int rows, int cvs, int chunk_rows, const Out& out) {
    const int cv = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    const bool active = cv < cvs;
    const int part = blockIdx.y;
    const int parts = gridDim.y;
    const int r_begin = part * chunk_rows;
    const int r_end = min(r_begin + chunk_rows, rows);
    const int ty = (int)threadIdx.y;
    const int tys = (int)blockDim.y;
    const xbn_vec<W>* dyv = reinterpret_cast<const xbn_vec<W>*>(dy);
    const xbn_vec<W>* xv = reinterpret_cast<const xbn_vec<W>*>(x);

    acc_t s_dy[W], s_dy_xmu[W], mu[W];
#pragma unroll
    for (int w = 0; w < W; ++w) {
        s_dy[w] = 0;
        s_dy_xmu[w] = 0;
        mu[w] = active ? mean[cv * W + w] : (acc_t)0;
    }
    if (active) {
        for (int r = r_begin + ty; r < r_end; r += XBN_UNROLL * tys) {
            xbn_vec<W> bdy[XBN_UNROLL], bx[XBN_UNROLL];
            int k = 0;
#pragma unroll
            for (int u = 0; u < XBN_UNROLL; ++u) {
                const int rr = r + u * tys;
                if (rr < r_end) {
                    bdy[u] = dyv[rr * cvs + cv];
                    bx[u] = xv[rr * cvs + cv];
                    k = u + 1;
                }
            }
#pragma unroll
            for (int u = 0; u < XBN_UNROLL; ++u) {
                if (u < k) {
#pragma unroll
                    for (int w = 0; w < W; ++w) {
                        const acc_t g = xbn_load_acc(bdy[u].v[w]);
                        s_dy[w] += g;
                        s_dy_xmu[w] += g * (xbn_load_acc(bx[u].v[w]) - mu[w]);
                    }
                }
            }
        }
    }

    xbn_column_sum2<W>(s_dy, s_dy_xmu);
    if (parts > 1) {
        if (ty == 0 && active) {
            const int slot = part * cvs + cv;
#pragma unroll
            for (int w = 0; w < W; ++w) {
                ws_dy[slot * W + w] = s_dy[w];
                ws_dy_xmu[slot * W + w] = s_dy_xmu[w];
            }
            __threadfence();
        }
        if (!xbn_arrive_last(counters + blockIdx.x, (unsigned int)parts)) return;

        // As in the channel-major kernel: slot order, rounds of XBN_MERGE_LOADS loads.
#pragma unroll
        for (int w = 0; w < W; ++w) {
            s_dy[w] = 0;
            s_dy_xmu[w] = 0;
        }
        const int merged = active ? parts : 0;
        for (int i = ty; i < merged; i += XBN_MERGE_LOADS * tys) {
            acc_t a[XBN_MERGE_LOADS][W], b[XBN_MERGE_LOADS][W];
#pragma unroll
            for (int u = 0; u < XBN_MERGE_LOADS; ++u) {
                const int j = i + u * tys;
                const int slot = j * cvs + cv;
#pragma unroll
                for (int w = 0; w < W; ++w) {
                    a[u][w] = j < parts ? xbn_ld_cg(ws_dy + slot * W + w) : (acc_t)0;
                    b[u][w] = j < parts ? xbn_ld_cg(ws_dy_xmu + slot * W + w) : (acc_t)0;
                }
            }
#pragma unroll
            for (int u = 0; u < XBN_MERGE_LOADS; ++u) {
                if (i + u * tys < parts) {
#pragma unroll
                    for (int w = 0; w < W; ++w) {
                        s_dy[w] += a[u][w];
                        s_dy_xmu[w] += b[u][w];
                    }
                }
            }
        }
        xbn_column_sum2<W>(s_dy, s_dy_xmu);
    }
    if (ty == 0 && active) {
#pragma unroll
        for (int w = 0; w < W; ++w) out(cv * W + w, s_dy[w], s_dy_xmu[w]);
    }
}

#define XBN_BACKWARD_OUT(COUNT)                                                                 \
    xbn_backward_out {                                                                         \
        inv, weight, dgamma, dbeta, k_dy, k_xmu, k_const, flags, COUNT                         \
    }

#define XBN_BACKWARD_REDUCE_ENTRIES(SUFFIX, W)                                                 \
    extern "C" __global__ void __launch_bounds__(XBN_MAX_THREADS)                             \
        xbn_backward_reduce_ncl_##SUFFIX(                                                      \
            const xbn_t* __restrict__ dy, const xbn_t* __restrict__ x,                         \
            const acc_t* __restrict__ mean, acc_t* __restrict__ sum_dy_out,                    \
            acc_t* __restrict__ sum_dy_xmu_out, acc_t* __restrict__ ws_dy,                     \
            acc_t* __restrict__ ws_dy_xmu, unsigned int* __restrict__ counters, int n_outer,   \
            int channels, int sv, int chunk) {                                                 \
        xbn_backward_reduce_ncl<W>(dy, x, mean, ws_dy, ws_dy_xmu, counters, n_outer, channels, \
                                   sv, chunk, xbn_reduce_out{sum_dy_out, sum_dy_xmu_out});     \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(XBN_MAX_THREADS)                             \
        xbn_backward_reduce_nlc_##SUFFIX(                                                      \
            const xbn_t* __restrict__ dy, const xbn_t* __restrict__ x,                         \
            const acc_t* __restrict__ mean, acc_t* __restrict__ sum_dy_out,                    \
            acc_t* __restrict__ sum_dy_xmu_out, acc_t* __restrict__ ws_dy,                     \
            acc_t* __restrict__ ws_dy_xmu, unsigned int* __restrict__ counters, int rows,      \
            int cvs, int chunk_rows) {                                                         \
        xbn_backward_reduce_nlc<W>(dy, x, mean, ws_dy, ws_dy_xmu, counters, rows, cvs,         \
                                   chunk_rows, xbn_reduce_out{sum_dy_out, sum_dy_xmu_out});    \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(XBN_MAX_THREADS)                             \
        xbn_backward_reduce_fused_ncl_##SUFFIX(                                                \
            const xbn_t* __restrict__ dy, const xbn_t* __restrict__ x,                         \
            const acc_t* __restrict__ mean, const acc_t* __restrict__ inv,                     \
            const void* __restrict__ weight, acc_t* __restrict__ dgamma,                       \
            acc_t* __restrict__ dbeta, acc_t* __restrict__ k_dy, acc_t* __restrict__ k_xmu,    \
            acc_t* __restrict__ k_const, acc_t* __restrict__ ws_dy,                            \
            acc_t* __restrict__ ws_dy_xmu, unsigned int* __restrict__ counters, int flags,     \
            int n_outer, int channels, int sv, int chunk) {                                    \
        xbn_backward_reduce_ncl<W>(dy, x, mean, ws_dy, ws_dy_xmu, counters, n_outer, channels, \
                                   sv, chunk, XBN_BACKWARD_OUT(n_outer * sv * W));             \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(XBN_MAX_THREADS)                             \
        xbn_backward_reduce_fused_nlc_##SUFFIX(                                                \
            const xbn_t* __restrict__ dy, const xbn_t* __restrict__ x,                         \
            const acc_t* __restrict__ mean, const acc_t* __restrict__ inv,                     \
            const void* __restrict__ weight, acc_t* __restrict__ dgamma,                       \
            acc_t* __restrict__ dbeta, acc_t* __restrict__ k_dy, acc_t* __restrict__ k_xmu,    \
            acc_t* __restrict__ k_const, acc_t* __restrict__ ws_dy,                            \
            acc_t* __restrict__ ws_dy_xmu, unsigned int* __restrict__ counters, int flags,     \
            int rows, int cvs, int chunk_rows) {                                               \
        xbn_backward_reduce_nlc<W>(dy, x, mean, ws_dy, ws_dy_xmu, counters, rows, cvs,         \
                                   chunk_rows, XBN_BACKWARD_OUT(rows));                        \
    }

XBN_FOR_EACH_WIDTH(XBN_BACKWARD_REDUCE_ENTRIES)
