#!/usr/bin/env python3
"""Time the training step of a `slotfix dump-step` file in PyTorch, on the same device as slotfix.

The issue's yardsticks (shared/reference/performance.md) were measured on an H100; a GPU session
may get another card. This runs the same model in PyTorch on whatever device is at hand, so that
slotfix's step can be compared on one device: the step of tools/replay_step.py (the model written
once, from plain PyTorch ops) in float32 with TF32 convolutions and matrix products, its backward,
and a fused Adam update, on the dump's fixed batch; median of --steps after --warmup steps, timed
with CUDA events (wall clock on the CPU), cuDNN autotuning on, as performance.md did.

    slotfix dump-step --cfg configs/clevr6.yaml --batch-size 64 --out step.safetensors
    python3 tools/torch_step_bench.py step.safetensors --device cuda [--compile]

Prints one Markdown table row: mode, config, ms / step (median, min, max), images / s, peak memory.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import replay_step  # noqa: E402  (the model's step, shared with the float64 replay)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dump")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="torch.compile the step (default mode)")
    ap.add_argument("--no-tf32", action="store_true", help="exact f32 convolutions and matrix products")
    ap.add_argument("--no-packages", action="store_true", help="read the dump without safetensors and pyyaml")
    a = ap.parse_args()
    cuda = a.device.startswith("cuda")
    torch.backends.cuda.matmul.allow_tf32 = not a.no_tf32
    torch.backends.cudnn.allow_tf32 = not a.no_tf32
    torch.backends.cudnn.benchmark = True
    t, meta = replay_step.read_dump(a.dump, not a.no_packages)
    m = replay_step.model_section(meta["config"], not a.no_packages)
    torch.set_default_dtype(torch.float32)
    torch.set_default_device(a.device)
    skip = ("grad.", "input.", "output.")
    P = {k: v.float().to(a.device).requires_grad_() for k, v in t.items() if not k.startswith(skip)}
    images = t["input.images"].float().to(a.device)
    noise = t["input.slot_noise"].float().to(a.device)
    masks = {int(k.rsplit(".", 1)[1]): v.float().to(a.device)
             for k, v in t.items() if k.startswith("input.dropout_mask.")}
    opt = torch.optim.Adam(list(P.values()), lr=4e-4, fused=cuda)

    def loss_fn():
        return replay_step.step(m, P, images, noise, masks)

    forward = torch.compile(loss_fn) if a.compile else loss_fn

    def train_step():
        loss = forward()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = []
    for i in range(a.warmup + a.steps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            train_step()
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            train_step()
            ms = 1e3 * (time.perf_counter() - t0)
        if i >= a.warmup:
            times.append(ms)
    B, H, W = images.shape[0], images.shape[1], images.shape[2]
    K = noise.shape[1]
    med = statistics.median(times)
    peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if cuda else "(CPU)"
    dev = torch.cuda.get_device_name() if cuda else "CPU"
    mode = ("torch.compile" if a.compile else "eager") + (", TF32" if cuda and not a.no_tf32 else ", f32")
    grad = "implicit" if m["implicit_diff"] else "BPTT"
    print(f"| PyTorch {torch.__version__} {mode} ({dev}) | {H}×{W}, K={K}, B={B}, {m['max_iter_fwd']} iterations, "
          f"{grad} | {med:.1f} | {min(times):.1f} | {max(times):.1f} | {1e3 * B / med:.1f} | {peak} |")


if __name__ == "__main__":
    main()
