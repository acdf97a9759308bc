"""The benchmark reporting module lives in the package (``sgattn._report``) so
that ``sgattn bench`` works from a normal install; this file re-exports it for
the suites and keeps ``python bench/report.py RECORDS.jsonl [OUT_DIR]``."""
import sys

from sgattn._report import *  # noqa: F401,F403
from sgattn._report import main

if __name__ == "__main__":
    sys.exit(main())
