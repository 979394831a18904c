// Runs one of xbn's CUDA kernels on the CPU (see cuda_host.h), for tests without a GPU.
//
//   driver KERNEL GX GY BX BY SEED NBUF FILE... NINT INT... [NDBL DBL...]
//
// Each FILE is read into a buffer of exactly its size (so AddressSanitizer sees any access past
// its end), passed to the kernel as the next pointer argument, and written back afterwards.
// INTs are the kernel's int arguments in order, DBLs its double arguments (any strtod syntax;
// hexadecimal floats carry them exactly). Exit status: 0 ok, 2 problems reported (printed
// on stderr), 3 usage or I/O error. Build with one of -DXBN_DTYPE_F32/F64/F16/BF16.

#include "cuda_host.h"

#include <ucontext.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <random>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define XBN_ASAN_FIBERS 1
#endif

#include "bn_backward_reduce.cu"
#include "bn_elementwise.cu"
#include "bn_stats.cu"

xbn_dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace {

enum class state { ready, at_syncthreads, at_warp, done };

struct fiber {
    ucontext_t ctx;
    char* stack = nullptr;
    state st = state::ready;
    xbn_dim3 tid;
    int linear = 0;
    unsigned long long deposit = 0;
    int src_lane = 0;
};

constexpr std::size_t kStack = 256 * 1024;
int g_problems = 0;
std::vector<fiber> g_fibers;
fiber* g_current = nullptr;
ucontext_t g_scheduler;
const std::function<void()>* g_body = nullptr;
#if defined(XBN_ASAN_FIBERS)
const void* g_sched_bottom = nullptr;
std::size_t g_sched_size = 0;
#endif

// Leave the running fiber for the scheduler (the fiber resumes here when released).
void yield_to_scheduler(bool finished) {
#if defined(XBN_ASAN_FIBERS)
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(finished ? nullptr : &fake, g_sched_bottom, g_sched_size);
    swapcontext(&g_current->ctx, &g_scheduler);
    __sanitizer_finish_switch_fiber(fake, &g_sched_bottom, &g_sched_size);
#else
    (void)finished;
    swapcontext(&g_current->ctx, &g_scheduler);
#endif
}

void fiber_main() {
#if defined(XBN_ASAN_FIBERS)
    __sanitizer_finish_switch_fiber(nullptr, &g_sched_bottom, &g_sched_size);
#endif
    (*g_body)();
    g_current->st = state::done;
    yield_to_scheduler(true);
}

void resume(fiber& f) {
    g_current = &f;
    threadIdx = f.tid;
#if defined(XBN_ASAN_FIBERS)
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(&fake, f.stack, kStack);
    swapcontext(&g_scheduler, &f.ctx);
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
    swapcontext(&g_scheduler, &f.ctx);
#endif
}

// All fibers wait somewhere: release a whole warp waiting at an exchange, else the block
// waiting at __syncthreads. Returns false on a deadlock (reported).
bool release() {
    const int n = (int)g_fibers.size();
    bool released = false;
    for (int w = 0; w * 32 < n; ++w) {
        const int lo = w * 32, hi = std::min(n, lo + 32);
        int at_warp = 0, done = 0;
        for (int i = lo; i < hi; ++i) {
            at_warp += g_fibers[i].st == state::at_warp;
            done += g_fibers[i].st == state::done;
        }
        if (at_warp == 0) continue;
        if (at_warp == hi - lo) {
            // Everyone deposited: each lane takes its source lane's value, then runs on.
            unsigned long long got[32];
            for (int i = lo; i < hi; ++i) got[i - lo] = g_fibers[lo + g_fibers[i].src_lane].deposit;
            for (int i = lo; i < hi; ++i) {
                g_fibers[i].deposit = got[i - lo];
                g_fibers[i].st = state::ready;
            }
            released = true;
        } else if (done > 0) {
            xbn_host_error("warp %d: __shfl_down_sync by %d lane(s) after %d returned", w, at_warp,
                           done);
            return false;
        }
    }
    if (released) return true;
    int at_sync = 0, done = 0;
    for (auto& f : g_fibers) {
        at_sync += f.st == state::at_syncthreads;
        done += f.st == state::done;
    }
    if (at_sync > 0 && at_sync + done == n) {
        if (done > 0) {
            xbn_host_error("__syncthreads reached by %d thread(s) after %d returned: divergent "
                           "barrier", at_sync, done);
        }
        for (auto& f : g_fibers) {
            if (f.st == state::at_syncthreads) f.st = state::ready;
        }
        return true;
    }
    xbn_host_error("deadlock: %d thread(s) at __syncthreads, the rest at warp exchanges", at_sync);
    return false;
}

}  // namespace

void xbn_host_error(const char* fmt, ...) {
    if (g_problems++ < 20) {
        std::va_list ap;
        va_start(ap, fmt);
        std::fprintf(stderr, "cuda_host: block (%u, %u) thread (%u, %u): ", blockIdx.x, blockIdx.y,
                     threadIdx.x, threadIdx.y);
        std::vfprintf(stderr, fmt, ap);
        std::fprintf(stderr, "\n");
        va_end(ap);
    }
}

void __syncthreads() {
    g_current->st = state::at_syncthreads;
    yield_to_scheduler(false);
}

unsigned long long xbn_host_warp_exchange(unsigned long long bits, int src_lane) {
    if (g_fibers.size() % 32 != 0) {
        xbn_host_error("__shfl_down_sync in a block of %d threads (not whole warps)",
                       (int)g_fibers.size());
        return bits;
    }
    g_current->deposit = bits;
    g_current->src_lane = src_lane;
    g_current->st = state::at_warp;
    yield_to_scheduler(false);
    return g_current->deposit;
}

int xbn_host_launch(unsigned gx, unsigned gy, unsigned bx, unsigned by, unsigned seed,
                    const std::function<void()>& body) {
    const int n = (int)(bx * by);
    if (n < 1 || n > XBN_MAX_THREADS || gx < 1 || gy < 1) {
        xbn_host_error("bad launch: grid (%u, %u), block (%u, %u)", gx, gy, bx, by);
        return g_problems;
    }
    std::mt19937 rng(seed);
    std::vector<unsigned> order(gx * gy);
    for (unsigned i = 0; i < order.size(); ++i) order[i] = i;
    if (seed != 0) std::shuffle(order.begin(), order.end(), rng);
    blockDim = {bx, by, 1};
    gridDim = {gx, gy, 1};
    g_body = &body;
    g_fibers.assign(n, fiber{});
    for (int t = 0; t < n; ++t) {
        g_fibers[t].stack = static_cast<char*>(std::malloc(kStack));
        g_fibers[t].tid = {(unsigned)(t % (int)bx), (unsigned)(t / (int)bx), 0};
        g_fibers[t].linear = t;
    }
    std::vector<int> ready;
    for (unsigned b : order) {
        blockIdx = {b % gx, b / gx, 0};
        for (auto& f : g_fibers) {
            f.st = state::ready;
            getcontext(&f.ctx);
            f.ctx.uc_stack.ss_sp = f.stack;
            f.ctx.uc_stack.ss_size = kStack;
            f.ctx.uc_link = nullptr;
            makecontext(&f.ctx, fiber_main, 0);
        }
        bool ok = true;
        while (ok) {
            ready.clear();
            for (int t = 0; t < n; ++t) {
                if (g_fibers[t].st == state::ready) ready.push_back(t);
            }
            if (ready.empty()) {
                bool all_done = true;
                for (auto& f : g_fibers) all_done = all_done && f.st == state::done;
                if (all_done) break;
                ok = release();
                continue;
            }
            if (seed != 0) std::shuffle(ready.begin(), ready.end(), rng);
            for (int t : ready) resume(g_fibers[t]);
        }
        if (!ok) break;  // fibers stuck mid-kernel cannot be resumed: abandon the launch
    }
    for (auto& f : g_fibers) std::free(f.stack);
    g_fibers.clear();
    return g_problems;
}

namespace {

using thunk = std::function<void(void** p, const int* a, const double* d)>;

template <class T>
T arg(void** p, int i) {
    return reinterpret_cast<T>(p[i]);
}

// A kernel's pointer, int and double arguments, each in order (p, a, d).
#define XBN_THUNK [](void** p, const int* a, const double* d)
#define XBN_NCL_INTS a[0], a[1], a[2], a[3]
#define XBN_NLC_INTS a[0], a[1], a[2]

#define XBN_STATS_FUSED_POINTERS                                                                   \
    arg<const xbn_t*>(p, 0), arg<acc_t*>(p, 1), arg<acc_t*>(p, 2), arg<acc_t*>(p, 3),              \
        arg<acc_t*>(p, 4), arg<const void*>(p, 5), arg<const void*>(p, 6),                         \
        arg<const void*>(p, 7), arg<const void*>(p, 8), arg<void*>(p, 9), arg<void*>(p, 10),       \
        arg<acc_t*>(p, 11), arg<acc_t*>(p, 12), arg<int*>(p, 13), arg<unsigned int*>(p, 14)
#define XBN_BACKWARD_FUSED_POINTERS                                                                \
    arg<const xbn_t*>(p, 0), arg<const xbn_t*>(p, 1), arg<const acc_t*>(p, 2),                     \
        arg<const acc_t*>(p, 3), arg<const void*>(p, 4), arg<acc_t*>(p, 5), arg<acc_t*>(p, 6),     \
        arg<acc_t*>(p, 7), arg<acc_t*>(p, 8), arg<acc_t*>(p, 9), arg<acc_t*>(p, 10),               \
        arg<acc_t*>(p, 11), arg<unsigned int*>(p, 12)

#define XBN_THUNKS(S)                                                                              \
    {"xbn_stats_ncl_" #S, {7, 4, 0, XBN_THUNK {                                                    \
         xbn_stats_ncl_##S(arg<const xbn_t*>(p, 0), arg<acc_t*>(p, 1), arg<acc_t*>(p, 2),          \
                           arg<acc_t*>(p, 3), arg<acc_t*>(p, 4), arg<int*>(p, 5),                  \
                           arg<unsigned int*>(p, 6), XBN_NCL_INTS);                                \
     }}},                                                                                          \
    {"xbn_stats_nlc_" #S, {7, 3, 0, XBN_THUNK {                                                    \
         xbn_stats_nlc_##S(arg<const xbn_t*>(p, 0), arg<acc_t*>(p, 1), arg<acc_t*>(p, 2),          \
                           arg<acc_t*>(p, 3), arg<acc_t*>(p, 4), arg<int*>(p, 5),                  \
                           arg<unsigned int*>(p, 6), XBN_NLC_INTS);                                \
     }}},                                                                                          \
    {"xbn_backward_reduce_ncl_" #S, {8, 4, 0, XBN_THUNK {                                          \
         xbn_backward_reduce_ncl_##S(arg<const xbn_t*>(p, 0), arg<const xbn_t*>(p, 1),             \
                                     arg<const acc_t*>(p, 2), arg<acc_t*>(p, 3),                   \
                                     arg<acc_t*>(p, 4), arg<acc_t*>(p, 5), arg<acc_t*>(p, 6),      \
                                     arg<unsigned int*>(p, 7), XBN_NCL_INTS);                      \
     }}},                                                                                          \
    {"xbn_backward_reduce_nlc_" #S, {8, 3, 0, XBN_THUNK {                                          \
         xbn_backward_reduce_nlc_##S(arg<const xbn_t*>(p, 0), arg<const xbn_t*>(p, 1),             \
                                     arg<const acc_t*>(p, 2), arg<acc_t*>(p, 3),                   \
                                     arg<acc_t*>(p, 4), arg<acc_t*>(p, 5), arg<acc_t*>(p, 6),      \
                                     arg<unsigned int*>(p, 7), XBN_NLC_INTS);                      \
     }}},                                                                                          \
    {"xbn_scale_shift_ncl_" #S, {4, 5, 0, XBN_THUNK {                                              \
         xbn_scale_shift_ncl_##S(arg<const xbn_t*>(p, 0), arg<const acc_t*>(p, 1),                 \
                                 arg<const acc_t*>(p, 2), a[0], arg<xbn_t*>(p, 3), a[1], a[2],     \
                                 a[3], a[4]);                                                      \
     }}},                                                                                          \
    {"xbn_scale_shift_nlc_" #S, {4, 4, 0, XBN_THUNK {                                              \
         xbn_scale_shift_nlc_##S(arg<const xbn_t*>(p, 0), arg<const acc_t*>(p, 1),                 \
                                 arg<const acc_t*>(p, 2), a[0], arg<xbn_t*>(p, 3), a[1], a[2],     \
                                 a[3]);                                                            \
     }}},                                                                                          \
    {"xbn_backward_apply_ncl_" #S, {7, 4, 0, XBN_THUNK {                                           \
         xbn_backward_apply_ncl_##S(arg<const xbn_t*>(p, 0), arg<const xbn_t*>(p, 1),              \
                                    arg<const acc_t*>(p, 2), arg<const acc_t*>(p, 3),              \
                                    arg<const acc_t*>(p, 4), arg<const acc_t*>(p, 5),              \
                                    arg<xbn_t*>(p, 6), XBN_NCL_INTS);                              \
     }}},                                                                                          \
    {"xbn_backward_apply_nlc_" #S, {7, 3, 0, XBN_THUNK {                                           \
         xbn_backward_apply_nlc_##S(arg<const xbn_t*>(p, 0), arg<const xbn_t*>(p, 1),              \
                                    arg<const acc_t*>(p, 2), arg<const acc_t*>(p, 3),              \
                                    arg<const acc_t*>(p, 4), arg<const acc_t*>(p, 5),              \
                                    arg<xbn_t*>(p, 6), XBN_NLC_INTS);                              \
     }}},                                                                                          \
    {"xbn_inference_ncl_" #S, {6, 5, 1, XBN_THUNK {                                                \
         xbn_inference_ncl_##S(arg<const xbn_t*>(p, 0), arg<const void*>(p, 1),                    \
                               arg<const void*>(p, 2), arg<const void*>(p, 3),                     \
                               arg<const void*>(p, 4), arg<xbn_t*>(p, 5), d[0], a[0], a[1], a[2],  \
                               a[3], a[4]);                                                        \
     }}},                                                                                          \
    {"xbn_inference_nlc_" #S, {6, 4, 1, XBN_THUNK {                                                \
         xbn_inference_nlc_##S(arg<const xbn_t*>(p, 0), arg<const void*>(p, 1),                    \
                               arg<const void*>(p, 2), arg<const void*>(p, 3),                     \
                               arg<const void*>(p, 4), arg<xbn_t*>(p, 5), d[0], a[0], a[1], a[2],  \
                               a[3]);                                                              \
     }}},                                                                                          \
    {"xbn_stats_fused_ncl_" #S, {15, 5, 4, XBN_THUNK {                                             \
         xbn_stats_fused_ncl_##S(XBN_STATS_FUSED_POINTERS, d[0], d[1], d[2], d[3], a[0], a[1],     \
                                 a[2], a[3], a[4]);                                                \
     }}},                                                                                          \
    {"xbn_stats_fused_nlc_" #S, {15, 4, 4, XBN_THUNK {                                             \
         xbn_stats_fused_nlc_##S(XBN_STATS_FUSED_POINTERS, d[0], d[1], d[2], d[3], a[0], a[1],     \
                                 a[2], a[3]);                                                      \
     }}},                                                                                          \
    {"xbn_backward_reduce_fused_ncl_" #S, {13, 5, 0, XBN_THUNK {                                   \
         xbn_backward_reduce_fused_ncl_##S(XBN_BACKWARD_FUSED_POINTERS, a[0], a[1], a[2], a[3],    \
                                           a[4]);                                                  \
     }}},                                                                                          \
    {"xbn_backward_reduce_fused_nlc_" #S, {13, 4, 0, XBN_THUNK {                                   \
         xbn_backward_reduce_fused_nlc_##S(XBN_BACKWARD_FUSED_POINTERS, a[0], a[1], a[2], a[3]);   \
     }}},

struct entry {
    int pointers;
    int ints;
    int doubles;
    thunk run;
};

const std::map<std::string, entry>& kernels() {
#define XBN_THUNKS_OF_WIDTH(S, W) XBN_THUNKS(S)
    static const std::map<std::string, entry> table = {XBN_FOR_EACH_WIDTH(XBN_THUNKS_OF_WIDTH)};
    return table;
}

struct buffer {
    std::string path;
    std::size_t size = 0;
    void* data = nullptr;
};

}  // namespace

int main(int argc, char** argv) {
    if (argc < 9) {
        std::fprintf(stderr, "usage: %s KERNEL GX GY BX BY SEED NBUF FILE... NINT INT... [NDBL DBL...]\n",
                     argv[0]);
        return 3;
    }
    const auto found = kernels().find(argv[1]);
    if (found == kernels().end()) {
        std::fprintf(stderr, "unknown kernel %s\n", argv[1]);
        return 3;
    }
    const entry& k = found->second;
    const unsigned gx = std::stoul(argv[2]), gy = std::stoul(argv[3]);
    const unsigned bx = std::stoul(argv[4]), by = std::stoul(argv[5]);
    const unsigned seed = std::stoul(argv[6]);
    int i = 7;
    const int nbuf = std::stoi(argv[i++]);
    if (nbuf != k.pointers || i + nbuf >= argc) {
        std::fprintf(stderr, "%s takes %d buffers, got %d\n", argv[1], k.pointers, nbuf);
        return 3;
    }
    std::vector<buffer> bufs(nbuf);
    std::vector<void*> ptrs(nbuf);
    for (int b = 0; b < nbuf; ++b) {
        bufs[b].path = argv[i++];
        FILE* f = std::fopen(bufs[b].path.c_str(), "rb");
        if (!f) return 3;
        std::fseek(f, 0, SEEK_END);
        bufs[b].size = (std::size_t)std::ftell(f);
        std::fseek(f, 0, SEEK_SET);
        // Exactly the file's size, 256-byte aligned like a CUDA allocation.
        if (posix_memalign(&bufs[b].data, 256, bufs[b].size ? bufs[b].size : 1) != 0) return 3;
        if (bufs[b].size && std::fread(bufs[b].data, 1, bufs[b].size, f) != bufs[b].size) return 3;
        std::fclose(f);
        ptrs[b] = bufs[b].data;
    }
    const int nint = std::stoi(argv[i++]);
    if (nint != k.ints || i + nint > argc) {
        std::fprintf(stderr, "%s takes %d ints, got %d\n", argv[1], k.ints, nint);
        return 3;
    }
    std::vector<int> ints(nint);
    for (int j = 0; j < nint; ++j) ints[j] = std::stoi(argv[i++]);
    const int ndbl = i < argc ? std::stoi(argv[i++]) : 0;
    if (ndbl != k.doubles || i + ndbl != argc) {
        std::fprintf(stderr, "%s takes %d doubles, got %d\n", argv[1], k.doubles, ndbl);
        return 3;
    }
    std::vector<double> dbls(ndbl + 1);
    for (int j = 0; j < ndbl; ++j) dbls[j] = std::strtod(argv[i++], nullptr);

    const int problems = xbn_host_launch(gx, gy, bx, by, seed,
                                         [&] { k.run(ptrs.data(), ints.data(), dbls.data()); });

    for (auto& b : bufs) {
        FILE* f = std::fopen(b.path.c_str(), "wb");
        if (!f) return 3;
        if (b.size) std::fwrite(b.data, 1, b.size, f);
        std::fclose(f);
        std::free(b.data);
    }
    if (problems) {
        std::fprintf(stderr, "cuda_host: %d problem(s)\n", problems);
        return 2;
    }
    return 0;
}
