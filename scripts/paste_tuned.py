"""Write a sweep's winners into the INT8 launch table.

    python scripts/paste_tuned.py SWEEP.tuned.txt [--note "sweep 10"]

Each line of the ``.tuned.txt`` that ``benchmarks/bench_int8_linear.py --sweep`` writes,
``(variant, bucket, N, K): (kernel, config),  # time``, replaces the entry of the same key in
``src/rotalabs_accel/triton_kernels/int8_config.py``'s ``TUNED`` (or is added at the table's end), with
the sweep's time and ``--note`` as its comment. The sweep times the table's current entries among its
candidates, so its winner is the fastest of that run. Prints what changed.
"""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

CONFIG = Path(__file__).resolve().parents[1] / "src" / "rotalabs_accel" / "triton_kernels" / "int8_config.py"
LINE = re.compile(r"^\s*(\(.*?\)):\s*(\(.*\)),\s*#\s*(.*)$")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tuned", type=Path)
    parser.add_argument("--note", default="", help="appended to each entry's comment, e.g. the sweep's name")
    args = parser.parse_args()
    source = CONFIG.read_text()
    start = source.index("TUNED: dict[")
    end = source.index("\n}\n", start)
    table = source[start:end]
    for line in args.tuned.read_text().splitlines():
        match = LINE.match(line)
        if not match:
            continue
        key_text, value, timing = match.groups()
        key = ast.literal_eval(key_text)
        comment = f"{timing} ({args.note})" if args.note else timing
        entry = f"    {key_text.replace(chr(39), chr(34))}: {value.replace(chr(39), chr(34))},  # {comment}"
        variant, bucket, n, k = key
        pattern = re.compile(rf'^    \("{variant}", "{bucket}", {n}, {k}\): .*$', re.M)
        if pattern.search(table):
            table = pattern.sub(lambda _, entry=entry: entry, table)
            print(f"replaced {key}: {entry.split(': ', 1)[1]}")
        else:
            table += "\n" + entry
            print(f"added {key}: {entry.split(': ', 1)[1]}")
    CONFIG.write_text(source[:start] + table + source[end:])


if __name__ == "__main__":
    main()
