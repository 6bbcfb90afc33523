#!/usr/bin/env python
"""Print the key table of the loss types (from d2_focalstar/modeling/losses.py's LOSS_TYPES) as
Markdown, or with --write, put it between the markers of docs/CONFIG.md:

    python tools/loss_table.py
    python tools/loss_table.py --write docs/CONFIG.md
"""

import argparse
import os

from d2_focalstar.fileio import atomic_write
from d2_focalstar.modeling.losses import config_table

BEGIN = "<!-- loss table: python tools/loss_table.py -->\n"
END = "<!-- end of loss table -->"


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--write", metavar="FILE", help="replace the table between the markers in FILE"
    )
    args = parser.parse_args(argv)
    if not args.write:
        print(config_table(), end="")
    else:
        # through a symlink to the file it names: the link stays a link
        target = os.path.realpath(args.write)
        if os.path.isdir(target):
            parser.error(
                f"--write {args.write}: a folder; give the Markdown file, e.g. docs/CONFIG.md"
            )
        try:
            with open(target, "rb") as f:
                text = f.read().decode("utf-8")
        except FileNotFoundError:
            parser.error(
                f"--write {args.write}: no such file; it must exist and hold the markers "
                f"{BEGIN.strip()} "
                f"... {END}"
            )
        except UnicodeDecodeError:
            parser.error(f"--write {args.write}: not a text file (not UTF-8)")
        except OSError as e:
            parser.error(f"--write {args.write}: cannot be read ({e.strerror or e})")
        if BEGIN not in text or END not in text:
            parser.error(f"{args.write}: no {BEGIN.strip()} ... {END} markers")
        head, rest = text.split(BEGIN, 1)
        new = head + BEGIN + config_table() + END + rest.split(END, 1)[1]
        try:
            atomic_write(target, lambda f: f.write(new.encode()))
        except OSError as e:
            parser.error(f"--write {args.write}: cannot be written ({e.strerror or e})")
        print(f"wrote the loss table into {args.write}")


if __name__ == "__main__":
    main()
