#!/usr/bin/env python3
"""Replay a `slotfix dump-step` file in PyTorch and compare.

Builds the model of the dump's config from plain PyTorch ops (autograd does the backward), loads
the dumped parameters, input batch, slot noise and dropout masks, runs the same training step in
float64 and compares the loss and every parameter gradient with slotfix's.

    slotfix dump-step --cfg configs/quickstart.yaml --out step.safetensors
    python3 tools/replay_step.py step.safetensors      # needs torch (safetensors, pyyaml if there)

Exit status 0 when the loss and every gradient agree within --tol (relative L2 error).
With --control tf32 (or f32), PyTorch also runs the step in float32 with TF32 convolutions and
matrix products (on a GPU; on the CPU there is no TF32, so plain f32), and each tensor's own
error against float64 is printed beside slotfix's: a tensor then agrees when slotfix's error is
within --tol or within --control-factor times PyTorch's own. This tells rounding that the
parameters amplify (a trained model's sharp attention, say) apart from a wrong gradient.
Only torch is required: without the safetensors or pyyaml packages (a GPU machine may have
PyTorch alone) the dump and the Model section of its config are read by the small readers below.
"""
import argparse
import json
import math
import struct
import sys

import torch
import torch.nn.functional as F

LN_EPS = 1e-5  # slotfix uses PyTorch's LayerNorm epsilon


SAFETENSORS_DTYPES = {"F32": torch.float32, "F64": torch.float64, "I64": torch.int64, "I32": torch.int32}


def read_dump(path, use_packages=True):
    """(tensors, metadata) of a safetensors file."""
    if use_packages:
        try:
            from safetensors import safe_open
            from safetensors.torch import load_file

            with safe_open(path, "pt") as f:
                return load_file(path), f.metadata()
        except ImportError:
            pass
    # The format: an 8-byte little-endian header length, a JSON header mapping each name to its
    # dtype, shape and byte range in the data that follows, and "__metadata__" (strings).
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    meta = header.pop("__metadata__", {})
    tensors = {}
    for name, t in header.items():
        a, b = t["data_offsets"]
        flat = torch.frombuffer(bytearray(data[a:b]), dtype=SAFETENSORS_DTYPES[t["dtype"]])
        tensors[name] = flat.reshape(t["shape"])
    return tensors, meta


def model_section(config_yaml, use_packages=True):
    """The Model section of the config slotfix stored in the dump, as a dict."""
    if use_packages:
        try:
            import yaml

            return yaml.safe_load(config_yaml)["Model"]
        except ImportError:
            pass
    # slotfix writes the config with serde_yaml: "Model:", then "  key: scalar" lines, and each
    # list as "  key:" followed by "  - item" lines. Enough of YAML for that, and no more.
    def scalar(v):
        if v in ("true", "false"):
            return v == "true"
        if v in ("null", "~"):
            return None
        for conv in (int, float):
            try:
                return conv(v)
            except ValueError:
                pass
        return v.strip("'\"")

    model, key, inside = {}, None, False
    for line in config_yaml.splitlines():
        if not line.startswith(" "):
            inside = line.strip() == "Model:"
            continue
        if not inside or not line.strip():
            continue
        item = line.strip()
        if item.startswith("- "):
            model[key].append(scalar(item[2:].strip()))
            continue
        key, _, value = item.partition(":")
        value = value.strip()
        model[key] = scalar(value) if value else []
    return model


def grid(h, w, like):
    """The soft position grid [u, v, 1-u, 1-v] with u, v = linspace(0, 1) ('ij'), on the device
    and in the dtype of `like`, the embedding's weight (torch.compile ignores set_default_device,
    so the device is named)."""
    opts = {"device": like.device, "dtype": like.dtype}
    u, v = torch.meshgrid(torch.linspace(0, 1, h, **opts), torch.linspace(0, 1, w, **opts), indexing="ij")
    return torch.stack([u, v, 1 - u, 1 - v], dim=-1)


def step(m, P, images, noise, masks):
    """The loss of one training step (model.md), channels-first like PyTorch."""
    B, H, W, _ = images.shape
    K, D = noise.shape[1], noise.shape[2]
    x = images.permute(0, 3, 1, 2)
    # Encoder: 5x5 'same' convs + ReLU, position embedding added, LayerNorm, per-token MLP.
    h = x
    for i in range(len(m["encoder_channels"])):
        h = F.relu(F.conv2d(h, P[f"encoder.convs.{i}.weight"], P[f"encoder.convs.{i}.bias"], padding=2))
    h = h.permute(0, 2, 3, 1) + F.linear(grid(H, W, P["encoder.pos.weight"]), P["encoder.pos.weight"], P["encoder.pos.bias"])
    C = h.shape[-1]
    tok = F.layer_norm(h.reshape(B, H * W, C), (C,), P["encoder.norm.weight"], P["encoder.norm.bias"], LN_EPS)
    for i in range(m["num_layers"]):
        tok = F.linear(tok, P[f"encoder.mlp.{2 * i}.weight"], P[f"encoder.mlp.{2 * i}.bias"])
        if i + 1 < m["num_layers"]:
            tok = F.relu(tok)
    # Slot attention.
    sa = "slot_attention."
    N, Fdim = tok.shape[1], tok.shape[2]
    inp = F.layer_norm(tok, (Fdim,), P[sa + "norm_inputs.weight"], P[sa + "norm_inputs.bias"], LN_EPS)
    k, v = F.linear(inp, P[sa + "project_k.weight"]), F.linear(inp, P[sa + "project_v.weight"])
    heads = m["num_heads"]
    dh = D // heads

    def cell(slots, mask):
        s = F.layer_norm(slots, (D,), P[sa + "norm_slots.weight"], P[sa + "norm_slots.bias"], LN_EPS)
        q = F.linear(s, P[sa + "project_q.weight"])
        logits = torch.einsum("bnhd,bkhd->bhnk", k.view(B, N, heads, dh), q.view(B, K, heads, dh)) * dh**-0.5
        attn = logits.softmax(dim=-1) + float(m["eps"])  # softmax over the slots
        attn = attn / attn.sum(dim=2, keepdim=True)  # weighted mean over the inputs
        upd = torch.einsum("bhnk,bnhd->bkhd", attn, v.view(B, N, heads, dh)).reshape(B, K, D)
        gi = F.linear(upd, P[sa + "gru.weight_ih"], P[sa + "gru.bias_ih"])
        gh = F.linear(slots, P[sa + "gru.weight_hh"], P[sa + "gru.bias_hh"])
        ir, iz, i_n = gi.chunk(3, dim=-1)
        hr, hz, h_n = gh.chunk(3, dim=-1)
        r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        n = torch.tanh(i_n + r * h_n)
        h1 = (1 - z) * n + z * slots
        y = F.relu(F.linear(F.layer_norm(h1, (D,), P[sa + "norm_mlp.weight"], P[sa + "norm_mlp.bias"], LN_EPS),
                            P[sa + "mlp.0.weight"], P[sa + "mlp.0.bias"]))
        if mask is not None:
            y = y * mask.view(B, K, -1)
        return h1 + F.linear(y, P[sa + "mlp.2.weight"], P[sa + "mlp.2.bias"])

    slots = P[sa + "slots_mu"] + P[sa + "slots_log_sigma"].exp() * noise
    T = m["max_iter_fwd"]
    if m["implicit_diff"]:
        with torch.no_grad():
            for t in range(T):
                slots = cell(slots, masks.get(t))
        slots = cell(slots.detach(), masks.get(T))
    else:
        for t in range(T):
            slots = cell(slots, masks.get(t))
    # Spatial broadcast decoder, per slot.
    z = slots.reshape(B * K, D)
    chans = m.get("decoder_channels")
    if m["decoder"] == "broadcast":
        chans = chans or [64] * 5
        g = m["decoder_init_size"]
        ups = int(round(math.log2(m["resolution"] / g)))
    else:
        chans = chans or [32] * 3
        g, ups = m["resolution"], 0
    pos = F.linear(grid(g, g, P["decoder.pos.weight"]), P["decoder.pos.weight"], P["decoder.pos.bias"]).permute(2, 0, 1)
    h = z[:, :, None, None] + pos[None]
    for i in range(len(chans)):
        wgt, b = P[f"decoder.convs.{i}.weight"], P[f"decoder.convs.{i}.bias"]
        if m["decoder"] == "full":
            h = F.conv2d(h, wgt, b, padding=2)
        elif i < ups:
            h = F.conv_transpose2d(h, wgt, b, stride=2, padding=2, output_padding=1)
        else:
            h = F.conv_transpose2d(h, wgt, b, stride=1, padding=2)
        h = F.relu(h)
    last = len(chans)
    wgt, b = P[f"decoder.convs.{last}.weight"], P[f"decoder.convs.{last}.bias"]
    h = F.conv2d(h, wgt, b, padding=1) if m["decoder"] == "full" else F.conv_transpose2d(h, wgt, b, padding=1)
    out = h.view(B, K, 4, H, W)
    alpha = out[:, :, 3:4].softmax(dim=1)  # over the slots
    recon = (out[:, :, :3] * alpha).sum(dim=1)
    return ((recon - x) ** 2).mean()


def run_step(m, t, dtype, device):
    """Loss and parameter gradients of one step in `dtype` (float64: the reference)."""
    torch.set_default_dtype(dtype)
    skip = ("grad.", "input.", "output.")
    P = {k: v.to(dtype).requires_grad_() for k, v in t.items() if not k.startswith(skip)}
    masks = {int(k.rsplit(".", 1)[1]): v.to(dtype) for k, v in t.items() if k.startswith("input.dropout_mask.")}
    loss = step(m, P, t["input.images"].to(dtype), t["input.slot_noise"].to(dtype), masks)
    loss.backward()
    grads = {k: (p.grad if p.grad is not None else torch.zeros_like(p)).double() for k, p in P.items()}
    torch.set_default_dtype(torch.float64)
    return loss.item(), grads


def rel(a, ref):
    den = ref.norm().item()
    return (a - ref).norm().item() / den if den > 0 else a.norm().item()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dump")
    ap.add_argument("--tol", type=float, default=1e-4, help="relative L2 error allowed (slotfix computes in f32)")
    ap.add_argument("--device", default="cpu", help="where PyTorch runs the step (e.g. cuda; float64 either way)")
    ap.add_argument("--no-packages", action="store_true", help="read the dump without safetensors and pyyaml")
    ap.add_argument("--control", choices=["tf32", "f32"], help="also run PyTorch in f32 (TF32 on a GPU) as a yardstick")
    ap.add_argument("--control-factor", type=float, default=4.0,
                    help="with --control: a tensor also agrees within this many times PyTorch's own error")
    a = ap.parse_args()
    t, meta = read_dump(a.dump, not a.no_packages)
    m = model_section(meta["config"], not a.no_packages)
    torch.set_default_device(a.device)
    t = {k: v.to(a.device) for k, v in t.items()}
    ref_loss, ref = run_step(m, t, torch.float64, a.device)
    control = None
    if a.control:
        tf32 = a.control == "tf32" and a.device.startswith("cuda")
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        c_loss, c_grads = run_step(m, t, torch.float32, a.device)
        control = ("TF32" if tf32 else "f32", c_loss, c_grads)
    ok = True
    ours = float(t["output.loss"][0])
    e = abs(ours - ref_loss) / abs(ref_loss)
    print(f"slotfix backend: {meta.get('backend', '(not recorded)')}; PyTorch {torch.__version__} in float64 on {a.device}")
    if control:
        print(f"yardstick: the same step in PyTorch, float32 with {control[0]} convolutions and matrix products; "
              f"a tensor agrees within {a.tol:g} or within {a.control_factor:g}x PyTorch's own error")
        print(f"| tensor | slotfix vs PyTorch (f64) | PyTorch {control[0]} vs PyTorch (f64) |\n| --- | ---: | ---: |")
        ce = abs(control[1] - ref_loss) / abs(ref_loss)
        ok &= e < max(a.tol, a.control_factor * ce)
        print(f"| loss ({ours:.6f} vs {ref_loss:.6f}) | {e:.2e} | {ce:.2e} |")
    else:
        ok &= e < a.tol
        print(f"| tensor | relative L2 error of slotfix vs PyTorch (f64) |\n| --- | ---: |")
        print(f"| loss ({ours:.6f} vs {ref_loss:.6f}) | {e:.2e} |")
    worst = 0.0
    largest = max(g.norm().item() for g in ref.values())
    for name, g_ref in ref.items():
        g = t["grad." + name].double()
        err = rel(g, g_ref)
        # Gradients that are zero in exact arithmetic (e.g. the bias of the slot LayerNorm, to
        # which the softmax over slots is invariant) are rounding noise in f32: compare absolutely.
        exact_zero = g_ref.norm().item() < 1e-12 * max(1.0, largest)
        allowed = a.tol
        cell = ""
        if control:
            cerr = rel(control[2][name], g_ref)
            allowed = max(a.tol, a.control_factor * cerr)
            cell = f" | {cerr:.2e}"
        bad = (err > allowed) and not (exact_zero and g.norm().item() < 1e-6)
        ok &= not bad
        worst = max(worst, 0.0 if exact_zero else err)
        print(f"| grad.{name} | {err:.2e}{'  <-- MISMATCH' if bad else ''}"
              f"{'  (zero in exact arithmetic)' if exact_zero else ''}{cell} |")
    rule = f"tolerance {a.tol:g}" + (f" or {a.control_factor:g}x PyTorch {control[0]}'s own error" if control else "")
    print(f"\nworst relative gradient error {worst:.2e}; {'AGREE' if ok else 'DISAGREE'} at {rule}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
