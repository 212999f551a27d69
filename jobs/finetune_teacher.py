"""Ray job entry point: `ray job submit --working-dir . -- python jobs/finetune_teacher.py ...` = `moedistill finetune-teacher ...`."""

import sys
from pathlib import Path

# Importable without installation: `ray job submit --working-dir .` ships the repo, not the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["finetune-teacher", *sys.argv[1:]]))
