#!/usr/bin/env python
"""Fig. 4 of the proposal: CE, FL (g=2) and FL* (g=0.125, 0.25, 0.5), alpha=1, against p_t,
with the gradient magnitude beside it, from the project's own loss functions.

    python tools/plot_losses.py --out docs/fig4_losses     # writes .png and .svg
"""

import argparse
import os
import sys

from d2_focalstar.run.errors import error_line
from d2_focalstar.study.fig4 import plot_fig4


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--out", default="output/fig4_losses", help="path prefix of the PNG and SVG"
    )
    args = parser.parse_args(argv)
    if not os.path.basename(args.out) or os.path.isdir(args.out):  # "", "out/", ".": no file name
        sys.exit(
            error_line(
                "plot_losses.py",
                f"--out {args.out!r} is not a path prefix: give the files' "
                "name too, e.g. --out docs/fig4_losses (writes docs/fig4_losses.png and .svg)",
            )
        )
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    for path in plot_fig4(args.out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
