// Forward statistics: per-channel mean and biased variance, Welford within a thread, Chan's
// merge across threads, blocks and the grid. Deterministic: every block owns a fixed slice of
// its channel, and the last block to finish merges the per-block partials in slice order, so
// the same input gives bitwise the same statistics whichever block happens to finish last.
//
// Entry points (_v1: scalar loads; _v2/_v4/_v8: W-element vectors of 8 or 16 bytes):
//   xbn_stats_ncl_v*  channel-major (N, C, S); grid (C, parts), block (threads, 1, 1)
//   xbn_stats_nlc_v*  channels-last (R, C); grid (ceil(C / W / TX), parts), block (TX, TY)
// Workspace (only when parts > 1): partial means, M2 and counts, C * parts each, and one
// zeroed unsigned counter per channel (ncl) or per column of blocks (nlc), left zeroed again.

#include "xbn_common.cuh"

// Statistics of the first k of XBN_UNROLL loaded vectors, merged into (mean, m2, n).
template <int W>
__device__ __forceinline__ void xbn_welford_group(const xbn_vec<W> (&buf)[XBN_UNROLL], int k,
                                                  acc_t& mean, acc_t& m2, int& n) {
    acc_t sum = 0;
#pragma unroll
    for (int u = 0; u < XBN_UNROLL; ++u) {
        if (u < k) {
#pragma unroll
            for (int w = 0; w < W; ++w) sum += xbn_load_acc(buf[u].v[w]);
        }
    }
    const int gn = k * W;
    const acc_t gmean = sum / (acc_t)gn;
    acc_t gm2 = 0;
#pragma unroll
    for (int u = 0; u < XBN_UNROLL; ++u) {
        if (u < k) {
#pragma unroll
            for (int w = 0; w < W; ++w) {
                const acc_t d = xbn_load_acc(buf[u].v[w]) - gmean;
                gm2 += d * d;
            }
        }
    }
    xbn_chan_merge(mean, m2, n, gmean, gm2, gn);
}

template <int W>
__device__ __forceinline__ void xbn_stats_ncl(const xbn_t* __restrict__ x,
                                              acc_t* __restrict__ mean_out,
                                              acc_t* __restrict__ var_out,
                                              acc_t* __restrict__ ws_mean,
                                              acc_t* __restrict__ ws_m2,
                                              int* __restrict__ ws_n,
                                              unsigned int* __restrict__ counters,
                                              int n_outer, int channels, int sv, int chunk) {
    const int c = blockIdx.x;
    const int part = blockIdx.y;
    const int parts = gridDim.y;
    const int mv = n_outer * sv;
    const int begin = part * chunk;
    const int end = min(begin + chunk, mv);
    const int csv = channels * sv;
    const xbn_vec<W>* xc = reinterpret_cast<const xbn_vec<W>*>(x) + c * sv;

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
        xbn_welford_group<W>(buf, k, mean, m2, n);
    }

    xbn_block_welford(mean, m2, n);
    if (parts == 1) {
        if (threadIdx.x == 0) {
            mean_out[c] = mean;
            var_out[c] = m2 / (acc_t)n;
        }
        return;
    }
    if (threadIdx.x == 0) {
        const int slot = c * parts + part;
        ws_mean[slot] = mean;
        ws_m2[slot] = m2;
        ws_n[slot] = n;
        __threadfence();
    }
    if (!xbn_arrive_last(counters + c, (unsigned int)parts)) return;

    // The last block: partials in slice order per thread, then the fixed block tree.
    mean = 0;
    m2 = 0;
    n = 0;
    for (int i = (int)threadIdx.x; i < parts; i += (int)blockDim.x) {
        const int slot = c * parts + i;
        xbn_chan_merge(mean, m2, n, xbn_ld_cg(ws_mean + slot), xbn_ld_cg(ws_m2 + slot),
                       xbn_ld_cg(ws_n + slot));
    }
    xbn_block_welford(mean, m2, n);
    if (threadIdx.x == 0) {
        mean_out[c] = mean;
        var_out[c] = m2 / (acc_t)n;
    }
    xbn_release_counter(counters + c);
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

template <int W>
__device__ __forceinline__ void xbn_stats_nlc(const xbn_t* __restrict__ x,
                                              acc_t* __restrict__ mean_out,
                                              acc_t* __restrict__ var_out,
                                              acc_t* __restrict__ ws_mean,
                                              acc_t* __restrict__ ws_m2,
                                              int* __restrict__ ws_n,
                                              unsigned int* __restrict__ counters,
                                              int rows, int cvs, int chunk_rows) {
    const int cv = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    const bool active = cv < cvs;
    const int part = blockIdx.y;
    const int parts = gridDim.y;
    const int r_begin = part * chunk_rows;
    const int r_end = min(r_begin + chunk_rows, rows);
    const int ty = (int)threadIdx.y;
    const int tys = (int)blockDim.y;
    const xbn_vec<W>* xv = reinterpret_cast<const xbn_vec<W>*>(x);

    acc_t mean[W], m2[W];
#pragma unroll
    for (int w = 0; w < W; ++w) {
        mean[w] = 0;
        m2[w] = 0;
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
            const acc_t inv_k = (acc_t)1 / (acc_t)k;
            acc_t gmean[W], gm2[W];
#pragma unroll
            for (int w = 0; w < W; ++w) {
                acc_t sum = 0;
#pragma unroll
                for (int u = 0; u < XBN_UNROLL; ++u) {
                    if (u < k) sum += xbn_load_acc(buf[u].v[w]);
                }
                gmean[w] = sum * inv_k;
                acc_t sq = 0;
#pragma unroll
                for (int u = 0; u < XBN_UNROLL; ++u) {
                    if (u < k) {
                        const acc_t d = xbn_load_acc(buf[u].v[w]) - gmean[w];
                        sq += d * d;
                    }
                }
                gm2[w] = sq;
            }
            xbn_chan_merge_shared<W>(mean, m2, n, gmean, gm2, k);
        }
    }

    xbn_column_welford<W>(mean, m2, n);
    if (parts == 1) {
        if (ty == 0 && active) {
#pragma unroll
            for (int w = 0; w < W; ++w) {
                mean_out[cv * W + w] = mean[w];
                var_out[cv * W + w] = m2[w] / (acc_t)n;
            }
        }
        return;
    }
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

#pragma unroll
    for (int w = 0; w < W; ++w) {
        mean[w] = 0;
        m2[w] = 0;
    }
    n = 0;
    if (active) {
        for (int i = ty; i < parts; i += tys) {
            const int slot = i * cvs + cv;
            acc_t mean_b[W], m2_b[W];
#pragma unroll
            for (int w = 0; w < W; ++w) {
                mean_b[w] = xbn_ld_cg(ws_mean + slot * W + w);
                m2_b[w] = xbn_ld_cg(ws_m2 + slot * W + w);
            }
            xbn_chan_merge_shared<W>(mean, m2, n, mean_b, m2_b, xbn_ld_cg(ws_n + slot));
        }
    }
    xbn_column_welford<W>(mean, m2, n);
    if (ty == 0 && active) {
#pragma unroll
        for (int w = 0; w < W; ++w) {
            mean_out[cv * W + w] = mean[w];
            var_out[cv * W + w] = m2[w] / (acc_t)n;
        }
    }
    xbn_release_counter(counters + blockIdx.x);
}

#define XBN_STATS_ENTRIES(SUFFIX, W)                                                         \
    extern "C" __global__ void __launch_bounds__(XBN_MAX_THREADS) xbn_stats_ncl_##SUFFIX(   \
        const xbn_t* __restrict__ x, acc_t* __restrict__ mean_out,                           \
        acc_t* __restrict__ var_out, acc_t* __restrict__ ws_mean, acc_t* __restrict__ ws_m2, \
        int* __restrict__ ws_n, unsigned int* __restrict__ counters, int n_outer,            \
        int channels, int sv, int chunk) {                                                   \
        xbn_stats_ncl<W>(x, mean_out, var_out, ws_mean, ws_m2, ws_n, counters, n_outer,      \
                         channels, sv, chunk);                                               \
    }                                                                                        \
    extern "C" __global__ void __launch_bounds__(XBN_MAX_THREADS) xbn_stats_nlc_##SUFFIX(   \
        const xbn_t* __restrict__ x, acc_t* __restrict__ mean_out,                           \
        acc_t* __restrict__ var_out, acc_t* __restrict__ ws_mean, acc_t* __restrict__ ws_m2, \
        int* __restrict__ ws_n, unsigned int* __restrict__ counters, int rows, int cvs,      \
        int chunk_rows) {                                                                    \
        xbn_stats_nlc<W>(x, mean_out, var_out, ws_mean, ws_m2, ws_n, counters, rows, cvs,    \
                         chunk_rows);                                                        \
    }

XBN_FOR_EACH_WIDTH(XBN_STATS_ENTRIES)
