"""Summarize a py-spy `--format raw` profile (collapsed stacks): where the samples go.

    .venv/bin/python bench/spy_summary.py bench/out/py-spy-ours-sotw-N=1000.txt [--top 25]

Prints the share of samples per thread root, the top functions by self time (the leaf
frame) and by inclusive time (anywhere on the stack, counted once per sample).
"""

from __future__ import annotations

import argparse
import re
from collections import Counter

_LOC = re.compile(r" \(([^()]*):\d+\)$")


def frame_name(frame: str, keep_line: bool) -> str:
    return frame if keep_line else _LOC.sub(lambda m: f" ({m.group(1)})", frame)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profile")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--lines", action="store_true", help="keep line numbers in frame names")
    ap.add_argument("--grep", default="", help="only stacks containing this text")
    args = ap.parse_args()

    self_c: Counter[str] = Counter()
    incl_c: Counter[str] = Counter()
    roots: Counter[str] = Counter()
    total = 0
    with open(args.profile) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            stack, _, count = line.rpartition(" ")
            if args.grep and args.grep not in stack:
                continue
            n = int(count)
            total += n
            frames = [frame_name(fr, args.lines) for fr in stack.split(";")]
            roots[frames[0]] += n
            self_c[frames[-1]] += n
            for fr in set(frames):
                incl_c[fr] += n
    if not total:
        print("no samples")
        return
    print(f"{total} samples")
    print("\nby thread root:")
    for name, n in roots.most_common(8):
        print(f"  {100 * n / total:5.1f}%  {name}")
    print("\nself (leaf frame):")
    for name, n in self_c.most_common(args.top):
        print(f"  {100 * n / total:5.1f}%  {name}")
    print("\ninclusive:")
    for name, n in incl_c.most_common(args.top):
        print(f"  {100 * n / total:5.1f}%  {name}")


if __name__ == "__main__":
    main()
