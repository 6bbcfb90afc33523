#!/usr/bin/env python
"""
Time the fused Triton loss kernel (FL*, forward + backward, and forward alone) on 16 x 201,600 x 80
logits for several block sizes, warp counts and blocks per forward program (the forward's loop),
with triton.testing.do_bench (median). Needs a GPU. The defaults in d2_focalstar/fused.py
(_BLOCK, _NUM_WARPS, _ITERS) are chosen from its output (docs/BENCHMARKS.md); it ends with the
fastest setting per dtype.

    python tools/fused_block_sweep.py --out output/fused_block_sweep.json
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark import FULL, make_labels  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--out", default="output/fused_block_sweep.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("tools/fused_block_sweep.py: error: no CUDA device (the kernel's speed means nothing in the interpreter)")
    import triton

    import d2_focalstar.fused as fz

    labels = make_labels(FULL, torch.device("cuda"))
    rows = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = (torch.randn(labels.numel(), FULL["classes"], device="cuda") * 4 - 4).to(dtype).requires_grad_(True)
        for block in (1024, 2048, 4096):
            for warps in (4, 8):
                for iters in (1, 2, 4, 8):
                    fz._BLOCK, fz._NUM_WARPS, fz._ITERS = block, warps, {"forward": iters, "backward": 1}

                    def fwd():
                        return fz.fused_classification_loss(x, labels, "FLSTAR", 0.25, 0.25, 100.0)

                    def step():
                        x.grad = None
                        fwd().backward()

                    ms = triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median")
                    fwd_ms = triton.testing.do_bench(fwd, warmup=25, rep=100, return_mode="median")
                    rows.append(dict(dtype=str(dtype), block=block, num_warps=warps, forward_iters=iters,
                                     ms=ms, fwd_ms=fwd_ms))
                    print(f"{dtype} BLOCK={block} num_warps={warps} forward ITERS={iters}: "
                          f"fwd+bwd {ms:.3f} ms, fwd {fwd_ms:.3f} ms", flush=True)
        del x
    for dtype in sorted({r["dtype"] for r in rows}):
        best = min((r for r in rows if r["dtype"] == dtype), key=lambda r: r["ms"])
        print(f"fastest for {dtype}: BLOCK={best['block']} num_warps={best['num_warps']} "
              f"forward ITERS={best['forward_iters']}: {best['ms']:.3f} ms (fwd {best['fwd_ms']:.3f})")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"wrote {args.out}")
