#!/usr/bin/env python
"""
What the fused loss kernel costs per element in machine instructions, without a GPU: compiles
d2_focalstar/modeling/fused.py's forward and backward kernels for a CUDA architecture with
Triton's own ptxas (no GPU or driver needed), disassembles them with its nvdisasm and counts the
SASS instructions of one program, divided by the elements that program handles.

    python tools/fused_sass_stats.py                        # sm_90 (H100), every loss and dtype
    python tools/fused_sass_stats.py --loss-types FLSTAR --dtypes fp32 --out output/sass.json

Why: the kernel's forward is bound by instruction issue, not memory (docs/BENCHMARKS.md), so the
instructions per element predict its speed and a change to the kernel's maths can be judged here
before it is timed on a GPU. The "issue-bound ms" column is a model, not a measurement: warp
instructions for 16 x 201,600 x 80 logits at one instruction per cycle on each of the SMs' four
schedulers (132 SMs at 1.755 GHz for an H100 SXM); the memory floor of the same pass is beside it
(the copy speed measured on an H100, 2944 GB/s). The kernel is compiled as a launch on that size
specialises it: every pointer and N divisible by 16.
"""

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.pop("TRITON_INTERPRET", None)  # compile the real kernels, not the interpreter's

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.tools.disasm import get_sass  # noqa: E402

import d2_focalstar.modeling.fused as fused  # noqa: E402
from d2_focalstar.modeling.losses import LOSS_TYPES  # noqa: E402

ELEMENTS = 16 * 201600 * 80
H100 = dict(sms=132, schedulers=4, ghz=1.755, copy_gbs=2944)
DTYPES = {"fp32": ("fp32", 4), "fp16": ("fp16", 2), "bf16": ("bf16", 2)}
_SASS_LINE = re.compile(r"^[0-9a-f-]{2}:[0-9a-f-]:[0-9a-f-]:[A-Z-]:\d+\t(.*)$")


def compile_kernel(which, loss_type, dtype, arch=90, num_classes=80):
    """The cubin of the forward or backward kernel, specialised like a launch on large tensors."""
    fn = fused._forward_kernel if which == "forward" else fused._backward_kernel
    # the launch arguments the module itself would pass for RetinaNet-sized logits
    logits = torch.empty(
        (ELEMENTS // num_classes, num_classes),
        device="meta",
        dtype=getattr(torch, {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[dtype]),
    )
    entry = LOSS_TYPES[loss_type]
    params = (
        {"gamma": 0.5, "max_factor": 100.0}
        if entry.capped
        else ({"gamma": 0.5} if entry.params else {})
    )
    entry, params = fused._kernel_entry(loss_type, 0.25, params)
    launch = fused._launch_args(logits, entry, 0.25, params, which=which)
    constexprs = {fn.arg_names[i]: launch[fn.arg_names[i]] for i in fn.constexprs}
    pointer_types = {
        "logits_ptr": "*" + DTYPES[dtype][0],
        "grad_ptr": "*" + DTYPES[dtype][0],
        "labels_ptr": "*i32",
    }  # other pointers: fp32 (partial sums, grad_out)
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = pointer_types.get(name, "*fp32")
        else:
            sig[name] = "i32" if isinstance(launch[name], int) else "fp32"
    # Triton specialises integer and pointer arguments divisible by 16 at launch
    divisible = [i for i, (name, ty) in enumerate(sig.items()) if ty.startswith("*") or name == "N"]
    attrs = {(i,): [["tt.divisibility", 16]] for i in divisible}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": launch["num_warps"], "maxnreg": launch.get("maxnreg")}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options).asm["cubin"]


def registers(cubin):
    """Registers per thread of the compiled kernel (cuobjdump -res-usage, Triton's own copy)."""
    cuobjdump = os.path.join(
        os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run(
            [cuobjdump, "-res-usage", path], capture_output=True, text=True, check=True
        ).stdout
    return int(re.search(r"REG:(\d+)", out).group(1))


def _sass(cubin):
    """The disassembly, with cuobjdump's stderr (a format warning per kernel) silenced."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            return get_sass(cubin)
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def count_instructions(cubin):
    """Opcode -> count over the SASS of one program (NOPs left out). The kernels are straight-line
    code (their loop over a program's blocks is unrolled), so this is what one program executes;
    a kernel with a real loop is refused rather than miscounted."""
    lines = []  # (label or None, opcode or None, branch target or None)
    for line in _sass(cubin).splitlines():
        label = re.match(r"^(\.?L\w+):", line.strip())
        if label:
            lines.append((label.group(1), None, None))
            continue
        m = _SASS_LINE.match(line)
        if not m:
            continue
        text = re.sub(r"^@!?U?P\w+\s+", "", m.group(1))
        target = re.match(r"BRA\s+`?\(?(\.?L\w+)", text)
        lines.append(
            (None, text.split()[0].rstrip(";").split(".")[0], target.group(1) if target else None)
        )
    where = {label: i for i, (label, _, _) in enumerate(lines) if label}
    for i, (_, _, target) in enumerate(lines):
        # a branch back over other instructions is a loop (the trap at the end branches to itself)
        if target in where and where[target] < i - 1:
            from d2_focalstar.run.errors import error_line

            raise SystemExit(
                error_line(
                    "tools/fused_sass_stats.py",
                    "the kernel has a loop; its instructions per element "
                    "would be miscounted (unroll it: tl.static_range)",
                )
            )
    return collections.Counter(op for _, op, _ in lines if op is not None and op != "NOP")


def stats(which, loss_type, dtype, arch=90):
    launch = fused.launch_setting(
        getattr(torch, {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[dtype])
    )
    iters = launch.forward_iters if which == "forward" else launch.backward_iters
    cubin = compile_kernel(which, loss_type, dtype, arch)
    ops = count_instructions(cubin)
    regs = registers(cubin)
    # elements each thread handles: ITERS blocks, each spread over the program's threads
    per_thread = iters * launch.block / (launch.num_warps * 32)
    total = sum(ops.values())
    per_element = total / per_thread
    warp_instructions = per_element * ELEMENTS / 32
    issue_ms = warp_instructions / (H100["sms"] * H100["schedulers"] * H100["ghz"] * 1e9) * 1e3
    nbytes = DTYPES[dtype][1] * ELEMENTS * (1 if which == "forward" else 2)
    return dict(
        kernel=which,
        loss_type=loss_type,
        dtype=dtype,
        arch=f"sm_{arch}",
        instructions=total,
        per_element=round(per_element, 1),
        registers=regs,
        spill_stores=ops["STL"],
        mufu_per_element=round(ops["MUFU"] / per_thread, 2),
        loads_per_element=round(ops["LDG"] / per_thread, 2),
        issue_bound_ms=round(issue_ms, 3),
        memory_floor_ms=round(nbytes / (H100["copy_gbs"] * 1e9) * 1e3, 3),
        opcodes=dict(ops.most_common()),
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    kernel_types = [t.name for t in LOSS_TYPES.values() if t.kernel is not None]
    p.add_argument("--loss-types", nargs="+", default=kernel_types, choices=kernel_types)
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10 (90: H100)")
    p.add_argument("--out", default=None, help="also write the rows (with opcode counts) as JSON")
    args = p.parse_args(argv)
    rows = [
        stats(which, loss, dtype, args.arch)
        for loss in args.loss_types
        for dtype in args.dtypes
        for which in ("forward", "backward")
    ]
    print(
        f"Fused kernel, SASS for sm_{args.arch}, launch settings by bytes per logit "
        f"{ {size: tuple(launch) for size, launch in fused._LAUNCH.items()} } "
        f"(block, warps, forward / backward blocks per program, register cap), "
        f"K = 80 (compiled offline; the ms columns are a model for one H100, not a timing)\n"
    )
    print(
        "| kernel | loss | dtype | instr / element | MUFU / element | loads / element "
        "| registers | spill stores | issue-bound ms | memory floor ms |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['kernel']} | {r['loss_type']} | {r['dtype']} | {r['per_element']} | "
            f"{r['mufu_per_element']} | {r['loads_per_element']} | {r['registers']} | "
            f"{r['spill_stores']} | {r['issue_bound_ms']} | {r['memory_floor_ms']} |"
        )
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
