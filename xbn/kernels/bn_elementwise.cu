// Elementwise passes, one read of each input and one write, per-channel coefficients in acc_t:
//   xbn_scale_shift_*     y  = x * scale + shift                          (shift optional)
//   xbn_inference_*       y  = x * scale + shift with scale and shift computed per channel
//                         from weight, bias and the running statistics (an eval-mode forward
//                         in one launch: xbn.functional.batch_norm_inference)
//   xbn_backward_apply_*  dx = dy * k_dy + (x - mean) * k_xmu + k_const
// Layouts and launch shapes as the reductions: *_ncl_* grid (C, parts) over (N, C, S) with the
// channel fixed per block (inference: grid (ceil(C / CB), parts), a channel per row of CB rows
// of threads), *_nlc_* grid (ceil(C / W / TX), parts) over (R, C) with each thread owning W
// channels for all of its rows; the coefficients are loaded (or computed) once per thread.
// Outputs must not alias inputs (__restrict__).

#include "xbn_common.cuh"

// Where y = x * scale + shift takes channel c's coefficients from: given arrays (scale_shift)...
struct xbn_given_coefficients {
    const acc_t* scale;
    const acc_t* shift;
    int has_shift;

    __device__ __forceinline__ void operator()(int c, acc_t& a, acc_t& b) const {
        a = scale[c];
        b = has_shift ? shift[c] : (acc_t)0;
    }
};

// ... or the running statistics (inference): xbn.functional.eval_statistics and
// scale_shift_coefficients formula for formula, each operation rounded once as the array
// operations round (invstd is 1 / sqrt(var + eps), not rsqrt), so that the kernel's y is the
// scale_shift kernel's with the generic coefficients, bit for bit. Parameters are float32, or
// float64 with XBN_PARAMS_F64; the host launches float64 ones only with float64 input.
struct xbn_eval_coefficients {
    const void* weight;
    const void* bias;
    const void* running_mean;
    const void* running_var;
    double eps;
    int flags;  // XBN_HAS_WEIGHT | XBN_HAS_BIAS | XBN_PARAMS_F64

    __device__ __forceinline__ void operator()(int c, acc_t& a, acc_t& b) const {
        const bool f64 = (flags & XBN_PARAMS_F64) != 0;
        const acc_t var = xbn_param(running_var, c, f64);
        const acc_t iv = xbn_div_rn((acc_t)1, xbn_sqrt_rn(xbn_add_rn(var, (acc_t)eps)));
        a = (flags & XBN_HAS_WEIGHT) ? xbn_mul_rn(iv, xbn_param(weight, c, f64)) : iv;
        b = xbn_mul_rn(-xbn_param(running_mean, c, f64), a);
        if (flags & XBN_HAS_BIAS) b = xbn_add_rn(b, xbn_param(bias, c, f64));
    }
};

// Packed: a channel per row of threads, c = blockIdx.x * blockDim.y + threadIdx.y, for the
// inference kernel, which the planner gives several channels a block where a channel needs
// fewer than XBN_MAX_THREADS threads (small N * S: an eval batch of a late layer). The other
// kernels keep c = blockIdx.x: the packed form costs them 8 registers, and residency with them.
template <int W, bool Packed, class Coef>
__device__ __forceinline__ void xbn_scale_shift_ncl(const xbn_t* __restrict__ x,
                                                    const Coef& coef, xbn_t* __restrict__ y,
                                                    int n_outer, int channels, int sv,
                                                    int chunk) {
    const int c = Packed ? (int)(blockIdx.x * blockDim.y + threadIdx.y) : (int)blockIdx.x;
    if (Packed && c >= channels) return;  // no barriers in this kernel
    const int mv = n_outer * sv;
    const int begin = (int)blockIdx.y * chunk;
    const int end = min(begin + chunk, mv);
    const int csv = channels * sv;
    const xbn_vec<W>* xc = reinterpret_cast<const xbn_vec<W>*>(x) + c * sv;
    xbn_vec<W>* yc = reinterpret_cast<xbn_vec<W>*>(y) + c * sv;
    acc_t a, b;
    coef(c, a, b);

    int m = begin + (int)threadIdx.x;
    xbn_ncl_walk walk(m, (int)blockDim.x, sv);
    while (m < end) {
        xbn_vec<W> buf[XBN_UNROLL];
        int off[XBN_UNROLL];
        int k = 0;
#pragma unroll
        for (int u = 0; u < XBN_UNROLL; ++u) {
            if (m < end) {
                off[u] = walk.offset(csv);
                buf[u] = xc[off[u]];
                k = u + 1;
            }
            m += (int)blockDim.x;
            walk.advance();
        }
#pragma unroll
        for (int u = 0; u < XBN_UNROLL; ++u) {
            if (u < k) {
                xbn_vec<W> out;
#pragma unroll
                for (int w = 0; w < W; ++w) {
                    out.v[w] = xbn_store_acc(fma(xbn_load_acc(buf[u].v[w]), a, b));
                }
                yc[off[u]] = out;
            }
        }
    }
}

template <int W>
__device__ __forceinline__ void xbn_backward_apply_ncl(
    const xbn_t* __restrict__ dy, const xbn_t* __restrict__ x, const acc_t* __restrict__ mean,
    const acc_t* __restrict__ k_dy, const acc_t* __restrict__ k_xmu,
    const acc_t* __restrict__ k_const, xbn_t* __restrict__ dx, int n_outer, int channels, int sv,
    int chunk) {
    const int c = blockIdx.x;
    const int mv = n_outer * sv;
    const int begin = (int)blockIdx.y * chunk;
    const int end = min(begin + chunk, mv);
    const int csv = channels * sv;
    const xbn_vec<W>* dyc = reinterpret_cast<const xbn_vec<W>*>(dy) + c * sv;
    const xbn_vec<W>* xc = reinterpret_cast<const xbn_vec<W>*>(x) + c * sv;
    xbn_vec<W>* dxc = reinterpret_cast<xbn_vec<W>*>(dx) + c * sv;
    const acc_t mu = mean[c];
    const acc_t a = k_dy[c];
    const acc_t b = k_xmu[c];
    const acc_t k = k_const[c];

    int m = begin + (int)threadIdx.x;
    xbn_ncl_walk walk(m, (int)blockDim.x, sv);
    while (m < end) {
        xbn_vec<W> bdy[XBN_UNROLL], bx[XBN_UNROLL];
        int off[XBN_UNROLL];
        int valid = 0;
#pragma unroll
        for (int u = 0; u < XBN_UNROLL; ++u) {
            if (m < end) {
                off[u] = walk.offset(csv);
                bdy[u] = dyc[off[u]];
                bx[u] = xc[off[u]];
                valid = u + 1;
            }
            m += (int)blockDim.x;
            walk.advance();
        }
#pragma unroll
        for (int u = 0; u < XBN_UNROLL; ++u) {
            if (u < valid) {
                xbn_vec<W> out;
#pragma unroll
                for (int w = 0; w < W; ++w) {
                    const acc_t xmu = xbn_load_acc(bx[u].v[w]) - mu;
                    out.v[w] = xbn_store_acc(fma(xbn_load_acc(bdy[u].v[w]), a, fma(xmu, b, k)));
                }
                dxc[off[u]] = out;
            }
        }
    }
}

template <int W, class Coef>
__device__ __forceinline__ void xbn_scale_shift_nlc(const xbn_t* __restrict__ x,
                                                    const Coef& coef, xbn_t* __restrict__ y,
                                                    int rows, int cvs, int chunk_rows) {
    const int cv = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    if (cv >= cvs) return;  // no barriers in this kernel
    const int r_begin = (int)blockIdx.y * chunk_rows;
    const int r_end = min(r_begin + chunk_rows, rows);
    const int tys = (int)blockDim.y;
    const xbn_vec<W>* xv = reinterpret_cast<const xbn_vec<W>*>(x);
    xbn_vec<W>* yv = reinterpret_cast<xbn_vec<W>*>(y);
    acc_t a[W], b[W];
#pragma unroll
    for (int w = 0; w < W; ++w) coef(cv * W + w, a[w], b[w]);
    for (int r = r_begin + (int)threadIdx.y; r < r_end; r += XBN_UNROLL * tys) {
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
#pragma unroll
        for (int u = 0; u < XBN_UNROLL; ++u) {
            if (u < k) {
                xbn_vec<W> out;
#pragma unroll
                for (int w = 0; w < W; ++w) {
                    out.v[w] = xbn_store_acc(fma(xbn_load_acc(buf[u].v[w]), a[w], b[w]));
                }
                yv[(r + u * tys) * cvs + cv] = out;
            }
        }
    }
}

template <int W>
__device__ __forceinline__ void xbn_backward_apply_nlc(
    const xbn_t* __restrict__ dy, const xbn_t* __restrict__ x, const acc_t* __restrict__ mean,
    const acc_t* __restrict__ k_dy, const acc_t* __restrict__ k_xmu,
    const acc_t* __restrict__ k_const, xbn_t* __restrict__ dx, int rows, int cvs,
    int chunk_rows) {
    const int cv = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    if (cv >= cvs) return;  // no barriers in this kernel
    const int r_begin = (int)blockIdx.y * chunk_rows;
    const int r_end = min(r_begin + chunk_rows, rows);
    const int tys = (int)blockDim.y;
    const xbn_vec<W>* dyv = reinterpret_cast<const xbn_vec<W>*>(dy);
    const xbn_vec<W>* xv = reinterpret_cast<const xbn_vec<W>*>(x);
    xbn_vec<W>* dxv = reinterpret_cast<xbn_vec<W>*>(dx);
    acc_t mu[W], a[W], b[W], kc[W];
#pragma unroll
    for (int w = 0; w < W; ++w) {
        mu[w] = mean[cv * W + w];
        a[w] = k_dy[cv * W + w];
        b[w] = k_xmu[cv * W + w];
        kc[w] = k_const[cv * W + w];
    }
    for (int r = r_begin + (int)threadIdx.y; r < r_end; r += XBN_UNROLL * tys) {
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
                xbn_vec<W> out;
#pragma unroll
                for (int w = 0; w < W; ++w) {
                    const acc_t xmu = xbn_load_acc(bx[u].v[w]) - mu[w];
                    out.v[w] = xbn_store_acc(fma(xbn_load_acc(bdy[u].v[w]), a[w], fma(xmu, b[w], kc[w])));
                }
                dxv[(r + u * tys) * cvs + cv] = out;
            }
        }
    }
}

#define XBN_ELEMENTWISE_ENTRIES(SUFFIX, W)                                                      \
    extern "C" __global__ void __launch_bounds__(XBN_MAX_THREADS) xbn_scale_shift_ncl_##SUFFIX( \
        const xbn_t* __restrict__ x, const acc_t* __restrict__ scale,                           \
        const acc_t* __restrict__ shift, int has_shift, xbn_t* __restrict__ y, int n_outer,     \
        int channels, int sv, int chunk) {                                                      \
        xbn_scale_shift_ncl<W, false>(x, xbn_given_coefficients{scale, shift, has_shift}, y,     \
                                      n_outer, channels, sv, chunk);                            \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(XBN_MAX_THREADS) xbn_scale_shift_nlc_##SUFFIX( \
        const xbn_t* __restrict__ x, const acc_t* __restrict__ scale,                           \
        const acc_t* __restrict__ shift, int has_shift, xbn_t* __restrict__ y, int rows,        \
        int cvs, int chunk_rows) {                                                              \
        xbn_scale_shift_nlc<W>(x, xbn_given_coefficients{scale, shift, has_shift}, y, rows, cvs, \
                               chunk_rows);                                                     \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(XBN_MAX_THREADS) xbn_inference_ncl_##SUFFIX(   \
        const xbn_t* __restrict__ x, const void* __restrict__ weight,                           \
        const void* __restrict__ bias, const void* __restrict__ running_mean,                   \
        const void* __restrict__ running_var, xbn_t* __restrict__ y, double eps, int flags,     \
        int n_outer, int channels, int sv, int chunk) {                                         \
        xbn_scale_shift_ncl<W, true>(                                                           \
            x, xbn_eval_coefficients{weight, bias, running_mean, running_var, eps, flags}, y,   \
            n_outer, channels, sv, chunk);                                                      \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(XBN_MAX_THREADS) xbn_inference_nlc_##SUFFIX(   \
        const xbn_t* __restrict__ x, const void* __restrict__ weight,                           \
        const void* __restrict__ bias, const void* __restrict__ running_mean,                   \
        const void* __restrict__ running_var, xbn_t* __restrict__ y, double eps, int flags,     \
        int rows, int cvs, int chunk_rows) {                                                    \
        xbn_scale_shift_nlc<W>(                                                                 \
            x, xbn_eval_coefficients{weight, bias, running_mean, running_var, eps, flags}, y,   \
            rows, cvs, chunk_rows);                                                             \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(XBN_MAX_THREADS)                              \
        xbn_backward_apply_ncl_##SUFFIX(                                                        \
            const xbn_t* __restrict__ dy, const xbn_t* __restrict__ x,                          \
            const acc_t* __restrict__ mean, const acc_t* __restrict__ k_dy,                     \
            const acc_t* __restrict__ k_xmu, const acc_t* __restrict__ k_const,                 \
            xbn_t* __restrict__ dx, int n_outer, int channels, int sv, int chunk) {             \
        xbn_backward_apply_ncl<W>(dy, x, mean, k_dy, k_xmu, k_const, dx, n_outer, channels, sv, \
                                  chunk);                                                       \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(XBN_MAX_THREADS)                              \
        xbn_backward_apply_nlc_##SUFFIX(                                                        \
            const xbn_t* __restrict__ dy, const xbn_t* __restrict__ x,                          \
            const acc_t* __restrict__ mean, const acc_t* __restrict__ k_dy,                     \
            const acc_t* __restrict__ k_xmu, const acc_t* __restrict__ k_const,                 \
            xbn_t* __restrict__ dx, int rows, int cvs, int chunk_rows) {                        \
        xbn_backward_apply_nlc<W>(dy, x, mean, k_dy, k_xmu, k_const, dx, rows, cvs,             \
                                  chunk_rows);                                                  \
    }

XBN_FOR_EACH_WIDTH(XBN_ELEMENTWISE_ENTRIES)
