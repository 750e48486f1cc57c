"""Flag values earlier versions of the CLI accepted under other names: still accepted, with a note on stderr."""

from __future__ import annotations

import sys

from sct_edge.engine.plan import FORMER_WORKLOAD_NAMES


def workload_argument(value: str) -> str:
    """argparse type of `--workload`: the current name, also for a former one ("seed" → "hidden-sum")."""
    current = FORMER_WORKLOAD_NAMES.get(value)
    if current is None:
        return value
    print(f"sct-edge: note: --workload {value} is now called --workload {current}", file=sys.stderr)
    return current
