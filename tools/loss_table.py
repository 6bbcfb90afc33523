#!/usr/bin/env python
"""Print the key table of the loss types (from d2_focalstar/modeling/losses.py's LOSS_TYPES) as Markdown,
or with --write, put it between the markers of docs/CONFIG.md:

    python tools/loss_table.py
    python tools/loss_table.py --write docs/CONFIG.md
"""
import argparse

from d2_focalstar.fileio import atomic_write
from d2_focalstar.modeling.losses import config_table

BEGIN = "<!-- loss table: python tools/loss_table.py -->\n"
END = "<!-- end of loss table -->"

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--write", metavar="FILE", help="replace the table between the markers in FILE")
    args = parser.parse_args(argv)
    if not args.write:
        print(config_table(), end="")
    else:
        with open(args.write) as f:
            text = f.read()
        if BEGIN not in text or END not in text:
            parser.error(f"{args.write}: no {BEGIN.strip()} ... {END} markers")
        head, rest = text.split(BEGIN, 1)
        new = head + BEGIN + config_table() + END + rest.split(END, 1)[1]
        atomic_write(args.write, lambda f: f.write(new.encode()))
        print(f"wrote the loss table into {args.write}")


if __name__ == "__main__":
    main()
