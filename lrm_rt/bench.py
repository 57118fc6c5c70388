"""``lrm-rt bench``: a thin entry into the benchmark suite, which lives in the top-level ``benchmarks/``
folder of a source checkout (it is not part of the installed package: it writes its results next to
itself and is run from a checkout or an editable install)."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import List, Optional

REPO = Path(__file__).resolve().parent.parent


def _load_suite():
    if not (REPO / "benchmarks" / "suite.py").is_file():
        # one error line and status 2, like the CLI's other errors (SystemExit("...") would exit 1)
        print(f"error: the benchmark suite is not here (expected {REPO / 'benchmarks' / 'suite.py'}): `lrm-rt bench` "
              "runs from a source checkout or an editable install (git clone ...; pip install -e .)", file=sys.stderr)
        raise SystemExit(2)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    return importlib.import_module("benchmarks.suite")


def main(argv: Optional[List[str]] = None) -> int:
    return _load_suite().main(list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
