"""Thin wrapper so a checkout can export without installing: ``python export/export.py --model M --out DIR``.

Same options as ``lrm-rt export`` (see export/README.md); the implementation is lrm_rt/export/.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lrm_rt.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
