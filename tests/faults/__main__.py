"""Print the fault suite's figures as a table.

    python -m tests.faults            # the table from the last run
    python -m tests.faults --run      # run the fault suite first (pytest -m faults), then the table
    python -m tests.faults --soak     # the load case at soak size (FAULT_LOAD_VMS=100, FAULT_LOAD_DATA_MIB=16
                                      # unless set), then the table
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

FIGURES = Path(__file__).resolve().parents[2] / "test-artifacts" / "fault-figures.json"
COLUMNS = [("case", "case"), ("result", "result"), ("sha256_match", "sha256"), ("bytes_recopied", "recopied"),
           ("max_concurrent_copies", "max conc."), ("leftovers", "leftovers"), ("non_terminal_rows", "non-term."),
           ("detect_s", "detect s"), ("resume_s", "resume s"), ("note", "note")]


def cell(value) -> str:
    if value is None:
        return "-"
    if value is True:
        return "match"
    if value is False:
        return "MISMATCH"
    if isinstance(value, int) and value >= 1024 * 1024:
        return f"{value / (1024 * 1024):.1f} MiB"
    return str(value)


def table(figures: dict) -> str:
    rows = [[cell(figures[case].get(key)) for key, _ in COLUMNS]
            for case in sorted(figures, key=lambda c: (int(re.match(r"\d+", c).group()), c))]
    header = [title for _, title in COLUMNS]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(COLUMNS))]
    line = lambda r: "| " + " | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def main(argv: list[str]) -> int:
    status = 0
    extra = [a for a in argv if a not in ("--run", "--soak")]
    if "--run" in argv:
        FIGURES.unlink(missing_ok=True)
        status = subprocess.call([sys.executable, "-m", "pytest", "-m", "faults", "tests/faults", *extra])
    elif "--soak" in argv:
        env = {"FAULT_LOAD_VMS": "100", "FAULT_LOAD_DATA_MIB": "16", **os.environ}
        status = subprocess.call([sys.executable, "-m", "pytest", "-m", "faults", "tests/faults/test_faults.py",
                                  "-k", "load", *extra], env=env)
    if not FIGURES.exists():
        print(f"no figures at {FIGURES}: run with --run", file=sys.stderr)
        return status or 1
    print(table(json.loads(FIGURES.read_text())))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
