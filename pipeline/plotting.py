"""matplotlib on the headless Agg backend: reports run on cluster nodes and in CI without a display."""

from __future__ import annotations

from typing import Any


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt
