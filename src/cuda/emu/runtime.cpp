// The scheduler of slotfix's kernel emulator: runs a grid of blocks, each block's threads as
// fibers on one OS thread, blocks spread over a few OS threads. x86-64 System V only.
#include "cuemu.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstring>
#include <atomic>
#include <deque>
#include <string>
#include <thread>
#include <vector>

thread_local CuemuThread* cuemu_cur;
thread_local int cuemu_exact_tf32;
thread_local uint3 cuemu_block_idx, cuemu_block_dim, cuemu_grid_dim;

// Saves the callee-saved registers on the current stack, stores the stack pointer in *from,
// switches to the stack `to` and restores the registers saved there.
extern "C" void cuemu_switch(void** from, void* to);
asm(R"(
    .text
    .globl cuemu_switch
    .type cuemu_switch, @function
cuemu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size cuemu_switch, .-cuemu_switch
)");

namespace {

enum State { READY, AT_BARRIER, AT_WARP, AT_WARPGROUP, DONE };

// 256 KiB per CUDA thread: kernels keep small arrays in registers; on the CPU they are on this
// stack. Only the touched pages are ever backed by memory.
constexpr size_t STACK_BYTES = 256 * 1024;
// Five cache lines, an odd number: 64 consecutive threads' stack tops fall into 64 different
// L1 sets. It costs a stack at most 80 KiB (256 threads' worth).
constexpr size_t STACK_STAGGER = 5 * 64;

// One wgmma.mma_async as the 128 threads of a warpgroup issued it.
struct WgmmaOp {
    CuemuWgmma lane[128];
};
// A warpgroup's wgmma.mma_async operations: issued but not yet committed (`open`), and the
// committed groups not yet waited for, oldest first. They execute when a wgmma.wait_group
// retires their group, not when issued: on the hardware they may read shared memory and the
// accumulators at any time until then, so a kernel that writes either before the wait gets
// wrong results here.
struct Warpgroup {
    std::vector<WgmmaOp> open;
    std::deque<std::vector<WgmmaOp>> committed;
    bool fenced = false;  // a wgmma.fence since the last wait_group (or the block's start)
};

struct Fiber {
    CuemuThread t;
    void* sp;
    State state;
    CuemuWarpFn warp_fn;
    void* payload;
    unsigned mask;
};

struct Worker {
    void (*entry)(void**);
    void** args;
    std::vector<Fiber> fibers;
    char* stacks = nullptr;
    size_t stack_count = 0;
    void* sched_sp = nullptr;
    Fiber* current = nullptr;
    std::vector<char> dyn_smem;  // the launch's bytes, then the guard
    size_t dyn_smem_bytes = 0;
    // The static __shared__ variables already poisoned in this block (cuemu_smem_fresh).
    std::vector<void*> fresh_smem;
    std::string error;
    // The block's bookkeeping, kept as the fibers suspend so that the scheduler's pass costs
    // what it releases, not the block's size: the fibers to resume next (ascending), and per
    // warp the lanes waiting at a warp-wide operation and the lanes that exited.
    std::vector<int> ready;
    std::vector<int> warp_waiting, warp_done;
    // Per warpgroup (4 consecutive warps): the threads waiting at a warpgroup-wide operation.
    std::vector<int> group_waiting;
    int waiting_at_barrier = 0, done = 0;
    // The block's wgmma state (cuemu_wgmma_*), one per warpgroup.
    std::vector<Warpgroup> groups;
    bool proxy_fenced = false;  // some thread executed fence.proxy.async
    // What the async proxy (wgmma's operand reads) sees of the dynamic shared memory: a copy
    // taken at each barrier that follows a fence.proxy.async (since the last barrier), so that
    // shared memory written and published without the fence reads as it was before.
    std::vector<char> async_smem;
    bool fenced_since_barrier = false;

    ~Worker() {
        if (stacks) munmap(stacks, stack_count * STACK_BYTES);
    }
};

thread_local Worker* worker;

// A guard past the end of the dynamic shared memory a launch asked for, as long as it (at least
// 4 KiB), poisoned like it (a read there reads NaN) and checked after each block (a write there
// fails the launch).
size_t dyn_smem_guard(size_t bytes) { return std::max<size_t>(bytes, 4096); }

// Whether every byte of p[0..n) is 0xff (a word at a time, without an early exit: this runs
// after every block).
bool all_ones(const char* p, size_t n) {
    uint64_t all = ~0ull;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t word;
        std::memcpy(&word, p + i, 8);
        all &= word;
    }
    for (; i < n; ++i) all &= 0xffffffffffffff00ull | (unsigned char)p[i];
    return all == ~0ull;
}

// Records that the current fiber stopped in state s (bookkeeping of Worker).
void count_stop(Worker* w, const Fiber* f, State s) {
    const int warp = f->t.linear / 32;
    if (s == DONE) {
        ++w->done;
        ++w->warp_done[warp];
    } else if (s == AT_WARP) {
        ++w->warp_waiting[warp];
    } else if (s == AT_WARPGROUP) {
        ++w->group_waiting[warp / 4];
    } else if (s == AT_BARRIER) {
        ++w->waiting_at_barrier;
    }
}

[[noreturn]] void fiber_main() {
    Worker* w = worker;
    w->entry(w->args);
    Fiber* f = w->current;
    f->state = DONE;
    count_stop(w, f, DONE);
    cuemu_switch(&f->sp, w->sched_sp);
    __builtin_unreachable();
}

void suspend(State s) {
    Worker* w = worker;
    Fiber* f = w->current;
    f->state = s;
    count_stop(w, f, s);
    cuemu_switch(&f->sp, w->sched_sp);
}

void resume(Worker* w, Fiber* f) {
    w->current = f;
    cuemu_cur = &f->t;
    cuemu_switch(&w->sched_sp, f->sp);
}

// Runs one block to completion; false (with w->error set) on a barrier or warp deadlock.
//
// The schedule: every ready thread runs until it stops at a barrier, at a warp-wide operation
// or at its end (forward and backward thread order in turn); then one warp whose lanes all wait
// at a warp-wide operation is released, the lowest such warp and the highest in turn, and its
// lanes are the next ready ones. Only when no warp can be released does the block barrier
// release every thread waiting at it.
bool run_block(Worker* w, const uint3 bid) {
    cuemu_block_idx = bid;
    const uint3 bd = cuemu_block_dim;
    const int n = (int)(bd.x * bd.y * bd.z);
    const int nwarps = (n + 31) / 32;
    std::fill(w->dyn_smem.begin(), w->dyn_smem.end(), (char)0xff);  // NaN until written
    w->fresh_smem.clear();
    w->ready.clear();
    w->warp_waiting.assign(nwarps, 0);
    w->warp_done.assign(nwarps, 0);
    const int ngroups = (nwarps + 3) / 4;
    w->group_waiting.assign(ngroups, 0);
    w->groups.assign(ngroups, Warpgroup{});
    w->proxy_fenced = false;
    w->async_smem.assign(w->dyn_smem_bytes, (char)0xff);
    w->fenced_since_barrier = false;
    w->waiting_at_barrier = 0;
    w->done = 0;
    for (int i = 0; i < n; ++i) {
        Fiber& f = w->fibers[i];
        f.t.tid = uint3{(unsigned)i % bd.x, ((unsigned)i / bd.x) % bd.y, (unsigned)i / (bd.x * bd.y)};
        f.t.linear = i;
        f.t.cp_pending = 0;
        f.state = READY;
        // Initial frame for cuemu_switch: six saved registers, then fiber_main as the return
        // address (16-byte aligned so that fiber_main starts with the ABI's alignment). Each
        // stack starts STACK_STAGGER bytes further below its top than the last one's: tops
        // exactly 256 KiB apart would all fall into the same cache sets, and a warp's 32
        // switches would evict each other's frames.
        void** sp = (void**)(w->stacks + (size_t)(i + 1) * STACK_BYTES -
                             (size_t)(i % 256) * STACK_STAGGER) -
                    8;
        for (int r = 0; r < 6; ++r) sp[r] = nullptr;
        sp[6] = (void*)&fiber_main;
        sp[7] = nullptr;
        f.sp = sp;
        w->ready.push_back(i);
    }
    bool forward = true;
    for (;;) {
        // Alternate the order in which the threads run between barriers, so that a missing
        // barrier between a write by one thread and a read by another shows up either way.
        const int nready = (int)w->ready.size();
        for (int j = 0; j < nready; ++j) resume(w, &w->fibers[w->ready[forward ? j : nready - 1 - j]]);
        w->ready.clear();
        forward = !forward;
        // Release one warp-wide operation per pass, from the lowest warp on even passes and the
        // highest on odd ones: warps then run far ahead of each other between block barriers,
        // so that a missing __syncthreads between warps shows too.
        bool released = false;
        for (int wi = 0; wi < nwarps && !released; ++wi) {
            const int warp = forward ? wi : nwarps - 1 - wi;
            const int w0 = 32 * warp;
            const int lanes = std::min(32, n - w0);
            const int at_warp = w->warp_waiting[warp], done = w->warp_done[warp];
            if (at_warp == 0) continue;
            if (at_warp != lanes) {
                if (at_warp + done == lanes) {
                    w->error = "warp " + std::to_string(warp) +
                               ": a warp-wide operation was reached by only " +
                               std::to_string(at_warp) + " of " + std::to_string(lanes) +
                               " lanes (the others exited)";
                    return false;
                }
                continue;  // the others are at a block barrier: resolved below or a deadlock
            }
            const unsigned full = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
            void* payloads[32];
            CuemuWarpFn fn = w->fibers[w0].warp_fn;
            for (int l = 0; l < lanes; ++l) {
                Fiber& f = w->fibers[w0 + l];
                if (f.warp_fn != fn || (f.mask & full) != full) {
                    w->error = "warp " + std::to_string(warp) +
                               ": lanes are at different warp-wide operations, or the mask "
                               "leaves lanes out (the emulator supports full-warp masks only)";
                    return false;
                }
                payloads[l] = f.payload;
            }
            if (fn) fn(payloads, lanes);
            for (int l = 0; l < lanes; ++l) {
                w->fibers[w0 + l].state = READY;
                w->ready.push_back(w0 + l);
            }
            w->warp_waiting[warp] = 0;
            released = true;
        }
        if (released) continue;
        // Then one warpgroup-wide operation (wgmma), all 128 threads of 4 warps at it.
        for (int gi = 0; gi < ngroups && !released; ++gi) {
            const int g = forward ? gi : ngroups - 1 - gi;
            const int t0 = 128 * g, threads = std::min(128, n - t0);
            const int waiting = w->group_waiting[g];
            if (waiting == 0) continue;
            int exited = 0;
            for (int wi = 4 * g; wi < std::min(4 * g + 4, nwarps); ++wi) exited += w->warp_done[wi];
            if (threads != 128) {
                w->error = "a warpgroup-wide operation in a block of " + std::to_string(n) +
                           " threads (warpgroups are 128 threads: 4 whole warps)";
                return false;
            }
            if (waiting != threads) {
                if (waiting + exited == threads) {
                    w->error = "warpgroup " + std::to_string(g) +
                               ": a warpgroup-wide operation was reached by only " +
                               std::to_string(waiting) + " of 128 threads (the others exited)";
                    return false;
                }
                continue;
            }
            void* payloads[128];
            CuemuWarpFn fn = w->fibers[t0].warp_fn;
            for (int l = 0; l < 128; ++l) {
                Fiber& f = w->fibers[t0 + l];
                if (f.warp_fn != fn) {
                    w->error = "warpgroup " + std::to_string(g) +
                               ": threads are at different warpgroup-wide operations";
                    return false;
                }
                payloads[l] = f.payload;
            }
            if (fn) fn(payloads, 128);
            for (int l = 0; l < 128; ++l) {
                w->fibers[t0 + l].state = READY;
                w->ready.push_back(t0 + l);
            }
            w->group_waiting[g] = 0;
            released = true;
        }
        if (released) continue;
        const int alive = n - w->done;
        if (alive == 0) {
            for (const Warpgroup& g : w->groups)
                if ((!g.open.empty() || !g.committed.empty()) && w->error.empty())
                    w->error = "wgmma.mma_async results never waited for (wgmma.commit_group and "
                               "wgmma.wait_group before the block ends)";
            // The guard past the dynamic shared memory must still be untouched (NaN bytes).
            if (!all_ones(w->dyn_smem.data() + w->dyn_smem_bytes,
                          w->dyn_smem.size() - w->dyn_smem_bytes) &&
                w->error.empty())
                w->error = "wrote past the " + std::to_string(w->dyn_smem_bytes) +
                           " bytes of dynamic shared memory the launch gave";
            return w->error.empty();  // a fault (cuemu_fault) fails the block
        }
        if (w->waiting_at_barrier != alive) {
            w->error = "deadlock: " + std::to_string(w->waiting_at_barrier) +
                       " threads wait at __syncthreads, " +
                       std::to_string(alive - w->waiting_at_barrier) + " at a warp-wide operation";
            return false;
        }
        if (w->fenced_since_barrier) {
            std::memcpy(w->async_smem.data(), w->dyn_smem.data(), w->dyn_smem_bytes);
            w->fenced_since_barrier = false;
        }
        // Threads that exited count as arrived, as on the hardware since Volta.
        for (int i = 0; i < n; ++i)
            if (w->fibers[i].state == AT_BARRIER) {
                w->fibers[i].state = READY;
                w->ready.push_back(i);
            }
        w->waiting_at_barrier = 0;
    }
}

}  // namespace

extern "C" void cuemu_syncthreads() { suspend(AT_BARRIER); }

extern "C" void cuemu_warp_op(CuemuWarpFn fn, void* payload, unsigned mask) {
    Fiber* f = worker->current;
    f->warp_fn = fn;
    f->payload = payload;
    f->mask = mask;
    suspend(AT_WARP);
}

extern "C" void* cuemu_dyn_smem() { return worker->dyn_smem.data(); }

extern "C" void cuemu_warpgroup_op(CuemuWarpFn fn, void* payload) {
    Fiber* f = worker->current;
    f->warp_fn = fn;
    f->payload = payload;
    f->mask = 0xffffffffu;
    suspend(AT_WARPGROUP);
}

// ---- wgmma (sm_90a's warpgroup MMA), as the PTX ISA describes it -------------------------
namespace {

// A shared-memory matrix descriptor: the operand's start, its leading-dimension byte offset
// (between the two core matrices of a k8 TF32 step, adjacent in K) and its stride-dimension byte
// offset (between core matrices adjacent in M or N), each in bits of 16 bytes; the emulator
// models the layout without swizzling (mode 0, base offset 0) only.
struct Desc {
    size_t start, lbo, sbo;
};

bool decode(uint64_t desc, Desc* d) {
    if ((desc >> 62) != 0 || ((desc >> 49) & 7) != 0) {
        cuemu_fault("wgmma descriptor with a swizzle mode or base offset (the emulator models the "
                    "no-swizzle layout only)");
        return false;
    }
    d->start = (size_t)(desc & 0x3fff) << 4;
    d->lbo = (size_t)((desc >> 16) & 0x3fff) << 4;
    d->sbo = (size_t)((desc >> 32) & 0x3fff) << 4;
    return true;
}

// Element (r, k) of a K-major operand of TF32 words without swizzling: core matrices of 8 rows ×
// 16 bytes (4 words), each contiguous (row after row); the two of a k8 step (k / 4) lbo bytes
// apart, the row groups (r / 8) sbo bytes apart. Read from the async proxy's copy (async_smem:
// as the last barrier after a fence.proxy.async left the shared memory).
unsigned operand_word(const Desc& d, int r, int k) {
    const size_t at = d.start + (size_t)(r % 8) * 16 + (size_t)(r / 8) * d.sbo + (size_t)(k % 4) * 4 +
                      (size_t)(k / 4) * d.lbo;
    if (at + 4 > worker->dyn_smem_bytes) {
        cuemu_fault("wgmma operand past the block's dynamic shared memory");
        return 0x7fffffffu;
    }
    unsigned v;
    std::memcpy(&v, worker->async_smem.data() + at, 4);
    return v;
}

// D(64 × n) = A(64 × 8)·B(8 × n) (+ D): thread t of the warpgroup, warp w = t / 32, lane
// (g, q) = (t % 32 / 4, t % 4) holds A's a[0..3] = A[16w+g][q], A[16w+g+8][q], A[16w+g][q+4],
// A[16w+g+8][q+4] (the register form) and D's d[4j..4j+3] = D[16w+g][8j+2q], D[16w+g][8j+2q+1],
// D[16w+g+8][8j+2q], D[16w+g+8][8j+2q+1] for j < n / 8. TF32 operands (their low 13 bits
// ignored, as the hardware does), exact products, each D summed in k order.
void wgmma_execute(const WgmmaOp& op) {
    const CuemuWgmma& c = op.lane[0];
    const int n = c.n;
    static thread_local float A[64][8], B[256][8], D[64][256];
    const unsigned keep = cuemu_exact_tf32 ? 0xffffffffu : 0xffffe000u;
    auto tf32 = [&](unsigned u) { return __builtin_bit_cast(float, u & keep); };
    Desc ad{}, bd{};
    if (!decode(c.bdesc, &bd) || (!c.a_in_regs && !decode(c.adesc, &ad))) return;
    for (int t = 0; t < 128; ++t) {
        const CuemuWgmma& l = op.lane[t];
        const int r = 16 * (t / 32) + (t % 32) / 4, q = t % 4;
        if (c.a_in_regs && std::memcmp(l.a, l.a_src, sizeof l.a) != 0)
            cuemu_fault("wgmma's A registers were written before the product completed "
                        "(wgmma.wait_group)");
        if (c.a_in_regs) {
            A[r][q] = tf32(l.a[0]);
            A[r + 8][q] = tf32(l.a[1]);
            A[r][q + 4] = tf32(l.a[2]);
            A[r + 8][q + 4] = tf32(l.a[3]);
        }
        for (int j = 0; j < n / 8; ++j) {
            const bool keep_d = c.scale_d != 0;
            D[r][8 * j + 2 * q] = keep_d ? l.d[4 * j] : 0.0f;
            D[r][8 * j + 2 * q + 1] = keep_d ? l.d[4 * j + 1] : 0.0f;
            D[r + 8][8 * j + 2 * q] = keep_d ? l.d[4 * j + 2] : 0.0f;
            D[r + 8][8 * j + 2 * q + 1] = keep_d ? l.d[4 * j + 3] : 0.0f;
        }
    }
    if (!c.a_in_regs)
        for (int r = 0; r < 64; ++r)
            for (int k = 0; k < 8; ++k) A[r][k] = tf32(operand_word(ad, r, k));
    for (int r = 0; r < n; ++r)
        for (int k = 0; k < 8; ++k) B[r][k] = tf32(operand_word(bd, r, k));
    for (int i = 0; i < 64; ++i)
        for (int k = 0; k < 8; ++k)
            for (int j = 0; j < n; ++j) D[i][j] += A[i][k] * B[j][k];
    for (int t = 0; t < 128; ++t) {
        const CuemuWgmma& l = op.lane[t];
        const int r = 16 * (t / 32) + (t % 32) / 4, q = t % 4;
        for (int j = 0; j < n / 8; ++j) {
            l.d[4 * j] = D[r][8 * j + 2 * q];
            l.d[4 * j + 1] = D[r][8 * j + 2 * q + 1];
            l.d[4 * j + 2] = D[r + 8][8 * j + 2 * q];
            l.d[4 * j + 3] = D[r + 8][8 * j + 2 * q + 1];
        }
    }
}

void wgmma_issue_apply(void** p, int lanes) {
    const CuemuWgmma& c = *(const CuemuWgmma*)p[0];
    Warpgroup& g = worker->groups[c.group];
    if (!g.fenced) cuemu_fault("wgmma.mma_async without a wgmma.fence since the last wgmma.wait_group");
    if (!worker->proxy_fenced)
        cuemu_fault("wgmma.mma_async reads shared memory, but no thread of the block has run "
                    "fence.proxy.async (generic-proxy writes are not visible to it without one)");
    if (c.n < 8 || c.n > 256 || c.n % 8) cuemu_fault("wgmma N not a multiple of 8 in 8..256");
    g.open.emplace_back();
    WgmmaOp& op = g.open.back();
    for (int l = 0; l < lanes; ++l) {
        const CuemuWgmma& x = *(const CuemuWgmma*)p[l];
        if (x.n != c.n || x.a_in_regs != c.a_in_regs || x.scale_d != c.scale_d || x.bdesc != c.bdesc ||
            (!c.a_in_regs && x.adesc != c.adesc))
            cuemu_fault("wgmma.mma_async with operands that differ between the warpgroup's threads");
        op.lane[l] = x;
    }
}

struct GroupArg {
    int group, arg;
};

void wgmma_fence_apply(void** p, int) { worker->groups[((GroupArg*)p[0])->group].fenced = true; }

void wgmma_commit_apply(void** p, int) {
    Warpgroup& g = worker->groups[((GroupArg*)p[0])->group];
    g.committed.push_back(std::move(g.open));
    g.open.clear();
}

// wgmma.wait_group N: every committed group but the newest N completes (executes, here).
void wgmma_wait_apply(void** p, int) {
    const GroupArg& a = *(GroupArg*)p[0];
    Warpgroup& g = worker->groups[a.group];
    while ((int)g.committed.size() > a.arg) {
        for (const WgmmaOp& op : g.committed.front()) wgmma_execute(op);
        g.committed.pop_front();
    }
    g.fenced = false;
}

}  // namespace

extern "C" void cuemu_wgmma_issue(CuemuWgmma* c) {
    c->group = cuemu_cur->linear / 128;
    cuemu_warpgroup_op(wgmma_issue_apply, c);
}

extern "C" void cuemu_wgmma_fence() {
    GroupArg a{cuemu_cur->linear / 128, 0};
    cuemu_warpgroup_op(wgmma_fence_apply, &a);
}

extern "C" void cuemu_wgmma_commit() {
    GroupArg a{cuemu_cur->linear / 128, 0};
    cuemu_warpgroup_op(wgmma_commit_apply, &a);
}

extern "C" void cuemu_wgmma_wait(int pending) {
    GroupArg a{cuemu_cur->linear / 128, pending};
    cuemu_warpgroup_op(wgmma_wait_apply, &a);
}

extern "C" void cuemu_fence_proxy_async() {
    worker->proxy_fenced = true;
    worker->fenced_since_barrier = true;
}

extern "C" void cuemu_smem_fresh(void* p, unsigned long bytes) {
    std::vector<void*>& seen = worker->fresh_smem;
    if (std::find(seen.begin(), seen.end(), p) != seen.end()) return;
    seen.push_back(p);
    std::memset(p, 0xff, bytes);
}

// A fault the hardware would raise (e.g. a misaligned vector load): the launch fails with `msg`
// (the first one), after the block completes.
extern "C" void cuemu_fault(const char* msg) {
    if (worker->error.empty()) worker->error = msg;
}

// Runs `entry(args)` over the grid. Returns 0, or 1 with a message in err.
extern "C" int cuemu_run(void (*entry)(void**), void** args, const unsigned* grid,
                         const unsigned* block, unsigned shared_bytes, int exact_tf32, char* err,
                         size_t err_len) {
    const uint3 gd{grid[0], grid[1], grid[2]}, bd{block[0], block[1], block[2]};
    const size_t threads = (size_t)bd.x * bd.y * bd.z;
    const size_t blocks = (size_t)gd.x * gd.y * gd.z;
    auto fail = [&](const std::string& m) {
        snprintf(err, err_len, "%s", m.c_str());
        return 1;
    };
    if (threads == 0 || threads > 1024) return fail("block of " + std::to_string(threads) + " threads");
    if (bd.z > 64 || gd.y > 65535 || gd.z > 65535) return fail("grid or block dimension out of range");
    if (blocks == 0) return 0;
    const size_t nworkers = std::min<size_t>(blocks, std::max(1u, std::thread::hardware_concurrency()));
    std::atomic<size_t> next{0};
    std::vector<std::string> errors(nworkers);
    auto work = [&](size_t id) {
        Worker w;
        worker = &w;
        cuemu_exact_tf32 = exact_tf32;
        w.entry = entry;
        w.args = args;
        w.fibers.resize(threads);
        w.stack_count = threads;
        void* m = mmap(nullptr, threads * STACK_BYTES, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) {
            errors[id] = "mmap of the fiber stacks failed";
            return;
        }
        w.stacks = (char*)m;
        w.dyn_smem_bytes = shared_bytes;
        w.dyn_smem.resize(shared_bytes + dyn_smem_guard(shared_bytes));
        cuemu_block_dim = bd;
        cuemu_grid_dim = gd;
        for (size_t b; (b = next.fetch_add(1)) < blocks;) {
            const uint3 bid{(unsigned)(b % gd.x), (unsigned)((b / gd.x) % gd.y), (unsigned)(b / ((size_t)gd.x * gd.y))};
            if (!run_block(&w, bid)) {
                errors[id] = "block (" + std::to_string(bid.x) + "," + std::to_string(bid.y) + "," +
                             std::to_string(bid.z) + "): " + w.error;
                next.store(blocks);
                return;
            }
        }
    };
    std::vector<std::thread> pool;
    for (size_t id = 1; id < nworkers; ++id) pool.emplace_back(work, id);
    work(0);
    for (auto& t : pool) t.join();
    for (auto& e : errors)
        if (!e.empty()) return fail(e);
    return 0;
}
