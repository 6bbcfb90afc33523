#!/usr/bin/env python
"""
Time the fused Triton loss kernel (FL*, forward + backward, and forward alone) on 16 x 201,600 x 80
logits for several block sizes, warp counts, blocks per forward program and register caps, with
triton.testing.do_bench (median). Needs a GPU (~3 min on an H100). The defaults in
d2_focalstar/fused.py (_BLOCK, _NUM_WARPS, _ITERS, _MAXNREG) are chosen from its output
(docs/BENCHMARKS.md); it ends with the fastest setting per dtype. The JSON is rewritten after
every setting, so a run cut off keeps what it measured.

    python tools/fused_block_sweep.py --out output/fused_block_sweep.json
"""
import argparse
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark import FULL, make_labels  # noqa: E402


def save(rows, path):
    """Write the rows as JSON through a temporary file: a kill leaves the previous version whole."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(rows, f, indent=1)
    os.replace(path + ".tmp", path)


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
        for block, warps, iters, maxnreg in itertools.product((1024, 2048), (4, 8), (1, 2, 4), (32, None)):
            fz._BLOCK, fz._NUM_WARPS, fz._MAXNREG = block, warps, maxnreg
            fz._ITERS = {"forward": iters, "backward": 1}

            def fwd():
                return fz.fused_classification_loss(x, labels, "FLSTAR", 0.25, 0.25, 100.0)

            def step():
                x.grad = None
                fwd().backward()

            ms = triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median")
            fwd_ms = triton.testing.do_bench(fwd, warmup=25, rep=100, return_mode="median")
            rows.append(dict(dtype=str(dtype), block=block, num_warps=warps, forward_iters=iters,
                             maxnreg=maxnreg, ms=ms, fwd_ms=fwd_ms))
            print(f"{dtype} BLOCK={block} num_warps={warps} forward ITERS={iters} maxnreg={maxnreg}: "
                  f"fwd+bwd {ms:.3f} ms, fwd {fwd_ms:.3f} ms", flush=True)
            save(rows, args.out)
        del x
    for dtype in sorted({r["dtype"] for r in rows}):
        best = min((r for r in rows if r["dtype"] == dtype), key=lambda r: r["ms"])
        print(f"fastest for {dtype}: BLOCK={best['block']} num_warps={best['num_warps']} "
              f"forward ITERS={best['forward_iters']} maxnreg={best['maxnreg']}: {best['ms']:.3f} ms "
              f"(fwd {best['fwd_ms']:.3f})")
    print(f"wrote {args.out}")
