"""`ray job submit --working-dir . -- python jobs/distill.py ...` runs `moedistill distill ...`."""

import sys
from pathlib import Path

# Importable without installation: `ray job submit --working-dir .` ships the repo, not the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["distill", *sys.argv[1:]]))
