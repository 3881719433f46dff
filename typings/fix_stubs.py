"""Make pybind11-stubgen's output valid Python (run once after copying the stubs from ../shared/typings/).

Two generator artifacts stop a parser: a parameter named ``in`` (a keyword; renamed ``in_``) and a parameter
without a default after one with a default (given ``= ...``). Nothing else is changed.
"""

import re
import sys
from pathlib import Path


def fix_def(line: str) -> str:
    line = re.sub(r"([(,] ?)in: ", r"\1in_: ", line)
    head, sep, rest = line.partition("(")
    if not sep or not head.lstrip().startswith("def "):
        return line
    params, close, tail = rest.rpartition(") ->")
    if not close:
        return line
    parts, depth, current = [], 0, ""  # split on top-level commas
    for char in params:
        if char in "[(":
            depth += 1
        elif char in "])":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    seen_default = False
    for i, part in enumerate(parts):
        name = part.strip()
        if "=" in name:
            seen_default = True
        elif seen_default and name and not name.startswith("*"):
            parts[i] = part + " = ..."
    return head + sep + ",".join(parts) + close + tail


for path in sys.argv[1:]:
    file = Path(path)
    file.write_text("".join(fix_def(line) for line in file.read_text().splitlines(keepends=True)))
