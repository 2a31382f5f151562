// The scheduler of slotfix's kernel emulator: runs a grid of blocks, each block's threads as
// fibers on one OS thread, blocks spread over a few OS threads. x86-64 System V only.
#include "cuemu.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstring>
#include <atomic>
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

enum State { READY, AT_BARRIER, AT_WARP, DONE };

// 256 KiB per CUDA thread: kernels keep small arrays in registers; on the CPU they are on this
// stack. Only the touched pages are ever backed by memory.
constexpr size_t STACK_BYTES = 256 * 1024;
// Five cache lines, an odd number: 64 consecutive threads' stack tops fall into 64 different
// L1 sets. It costs a stack at most 80 KiB (256 threads' worth).
constexpr size_t STACK_STAGGER = 5 * 64;

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
    int waiting_at_barrier = 0, done = 0;

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
        const int alive = n - w->done;
        if (alive == 0) {
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
