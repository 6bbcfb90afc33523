#!/usr/bin/env python
"""
Time the fused Triton loss kernel (FL*, forward + backward, and forward alone) on 16 x 201,600 x 80
logits for several block sizes, warp counts, blocks per forward program and register caps, with
triton.testing.do_bench (median). Needs a GPU; each of the 24 settings per dtype compiles its
kernels and times them for about a quarter of a second (not yet timed as a whole). The defaults in
d2_focalstar/modeling/fused.py (_LAUNCH, per element size) are chosen from its output
(docs/BENCHMARKS.md) and are timed first; it ends with the fastest setting per dtype. The JSON is
rewritten after every setting, so a run cut off keeps what it measured.

    python tools/fused_block_sweep.py --out output/fused_block_sweep.json [--dtypes fp32 fp16]
"""

import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark import DTYPES, FULL, make_labels  # noqa: E402


def settings(default):
    """(block, warps, forward blocks per program, register cap), the kernel's current default
    first: a sweep cut off by a time limit has still timed what the project ships."""
    grid = list(itertools.product((1024, 2048), (4, 8), (1, 2, 4), (32, None)))
    return [default] + [s for s in grid if s != default]


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--out", default="output/fused_block_sweep.json")
    parser.add_argument(
        "--dtypes",
        nargs="+",
        default=list(DTYPES),
        choices=list(DTYPES),
        help="logit dtypes to sweep, in this order (24 settings each)",
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        from d2_focalstar.run.errors import error_line

        sys.exit(
            error_line(
                "tools/fused_block_sweep.py",
                "no CUDA device (the kernel's speed means nothing in the interpreter)",
            )
        )
    import triton

    import d2_focalstar.modeling.fused as fz
    from d2_focalstar.fileio import write_json  # a kill leaves the previous JSON whole

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    labels = make_labels(FULL, torch.device("cuda"))
    rows = []
    for name in args.dtypes:
        dtype = DTYPES[name]
        x = (
            (torch.randn(labels.numel(), FULL["classes"], device="cuda") * 4 - 4)
            .to(dtype)
            .requires_grad_(True)
        )
        size = torch.finfo(dtype).bits // 8
        shipped = fz._LAUNCH[size]
        default = (shipped.block, shipped.num_warps, shipped.forward_iters, shipped.maxnreg)
        for block, warps, iters, maxnreg in settings(default):
            fz._LAUNCH = {**fz._LAUNCH, size: fz.Launch(block, warps, iters, 1, maxnreg)}

            def fwd():
                return fz.fused_classification_loss(x, labels, "FLSTAR", 0.25, 0.25, 100.0)

            def step():
                x.grad = None
                fwd().backward()

            ms = triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median")
            fwd_ms = triton.testing.do_bench(fwd, warmup=25, rep=100, return_mode="median")
            rows.append(
                dict(
                    dtype=str(dtype),
                    block=block,
                    num_warps=warps,
                    forward_iters=iters,
                    maxnreg=maxnreg,
                    default=(block, warps, iters, maxnreg) == default,
                    ms=ms,
                    fwd_ms=fwd_ms,
                )
            )
            print(
                f"{dtype} BLOCK={block} num_warps={warps} forward ITERS={iters} maxnreg={maxnreg}"
                f"{' (default)' if rows[-1]['default'] else ''}: fwd+bwd {ms:.3f} ms, "
                f"fwd {fwd_ms:.3f} ms",
                flush=True,
            )
            write_json(args.out, rows, indent=1)
        x = None  # drop the tensor (its cell too, which step() reads) before the next dtype's
        fz._LAUNCH = {**fz._LAUNCH, size: shipped}
    for dtype in sorted({r["dtype"] for r in rows}):
        best = min((r for r in rows if r["dtype"] == dtype), key=lambda r: r["ms"])
        print(
            f"fastest for {dtype}: BLOCK={best['block']} num_warps={best['num_warps']} "
            f"forward ITERS={best['forward_iters']} maxnreg={best['maxnreg']}: {best['ms']:.3f} ms "
            f"(fwd {best['fwd_ms']:.3f})"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
