#!/usr/bin/env python3
"""The machine code of slotfix's kernels without a GPU: compile kernels/FILE with NVRTC to an
sm_90 (or --arch) cubin, disassemble it with nvdisasm, and count the instructions of each
kernel's loops that contain tensor-core (HMMA) instructions, by kind. The loops of the TF32
convolutions are issue-bound on paper (benches/NOTES.md), so these counts predict their speed.

    python3 tools/kernel_sass.py conv_tc_v5.cu [KERNEL ...] [--arch sm_90] [--dump FILE.sass]

Needs libnvrtc (as .ci/run installs it: on LD_LIBRARY_PATH) and nvdisasm, installed on first
use from PyPI's nvidia-cuda-nvdisasm into ~/.cache/slotfix/nvdisasm. The counts are static:
both sides of a branch inside a loop are counted.
"""
import collections, ctypes, glob, os, re, subprocess, sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NVDISASM_DIR = os.path.expanduser("~/.cache/slotfix/nvdisasm")


def nvdisasm():
    found = glob.glob(f"{NVDISASM_DIR}/nvidia/*/bin/nvdisasm")
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
                        NVDISASM_DIR, "nvidia-cuda-nvdisasm"], check=True)
        found = glob.glob(f"{NVDISASM_DIR}/nvidia/*/bin/nvdisasm")
    os.chmod(found[0], 0o755)
    return found[0]


def expanded(file, pasted):
    """kernels/FILE with the headers of kernels/ it includes pasted in, once each, as
    src/cuda/kernels.rs pastes them for NVRTC."""
    out = [f'#line 1 "{file}"']
    for i, line in enumerate(open(f"{ROOT}/kernels/{file}").read().splitlines()):
        m = re.fullmatch(r'\s*#include\s*"([^"]+)"\s*', line)
        if not m:
            out.append(line)
            continue
        if m.group(1) not in pasted:
            pasted.add(m.group(1))
            out.append(expanded(m.group(1), pasted))
        out.append(f'#line {i + 2} "{file}"')
    return "\n".join(out)


def cubin(file, arch):
    lib = ctypes.CDLL("libnvrtc.so.13")
    common = open(f"{ROOT}/kernels/common.cuh").read()
    src = f"{common}\n{expanded(file, set())}\n".encode()
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), src, file.encode(), 0, None, None) == 0
    opts = (ctypes.c_char_p * 1)(f"--gpu-architecture={arch}".encode())
    if lib.nvrtcCompileProgram(prog, 1, opts) != 0:
        n = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
        log = ctypes.create_string_buffer(n.value)
        lib.nvrtcGetProgramLog(prog, log)
        sys.exit(log.value.decode())
    n = ctypes.c_size_t()
    lib.nvrtcGetCUBINSize(prog, ctypes.byref(n))
    out = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetCUBIN(prog, out)
    return out.raw


def main():
    args = sys.argv[1:]
    arch = args.pop(args.index("--arch") + 1) if "--arch" in args else "sm_90"
    args = [a for a in args if a != "--arch"]
    dump = args.pop(args.index("--dump") + 1) if "--dump" in args else None
    args = [a for a in args if a != "--dump"]
    if not args:
        sys.exit(__doc__)
    file, wanted = args[0], args[1:]
    path = f"/tmp/slotfix_{file}.{arch}.cubin"
    open(path, "wb").write(cubin(file, arch))
    sass = subprocess.run([nvdisasm(), "-c", path], capture_output=True, text=True, check=True).stdout
    if dump:
        open(dump, "w").write(sass)
    funcs, cur = {}, None
    for line in sass.splitlines():
        m = re.match(r"\s*\.text\.(\w+):", line)
        if m:
            cur = m.group(1)
            funcs[cur] = []
        elif cur:
            funcs[cur].append(line)
    for name in wanted or sorted(funcs):
        labels, ops = {}, []
        for line in funcs[name]:
            m = re.match(r"\s*(\.L_x_\d+):", line)
            if m:
                labels[m.group(1)] = len(ops)
                continue
            m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*(.*?);", line)
            if m:
                ops.append((m.group(2), m.group(3)))
        hmma = sum(op.startswith("HMMA") for op, _ in ops)
        print(f"{name}: {len(ops)} instructions, {hmma} HMMA")
        for at, (op, rest) in enumerate(ops):
            target = re.search(r"(\.L_x_\d+)", rest) if op.startswith("BRA") else None
            start = labels.get(target.group(1)) if target else None
            if start is None or start > at:
                continue
            body = ops[start:at + 1]
            n = sum(o.startswith("HMMA") for o, _ in body)
            if n:
                kinds = collections.Counter(o.split(".")[0] for o, _ in body)
                print(f"  loop of {len(body)} instructions, {n} HMMA: "
                      + ", ".join(f"{k} {v}" for k, v in kinds.most_common(12)))


if __name__ == "__main__":
    main()
