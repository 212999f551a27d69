"""Where the repository's files are, for tests in any folder."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"
TINY = TESTS / "configs" / "tiny.yaml"  # the integration tests' config: every stage runs in seconds on 2 CPUs
DEMO = REPO / "jobs" / "configs" / "demo.yaml"
CONFIGS = REPO / "jobs" / "configs"
