"""How every CLI of the project reports failures: one line on stderr, no traceback."""

from __future__ import annotations

import os
import sys
from typing import Callable

from .errors import BitNetError

EXIT_USER_ERROR = 2
EXIT_RUN_FAILED = 1


def run_cli(fn: Callable[[], object]) -> int:
    """Run fn; a BitNetError prints `error: <message>` and returns 2 (1 for a failed run).
    BITNET_TRACEBACK=1 re-raises for debugging."""
    try:
        fn()
        return 0
    except BitNetError as e:
        if os.environ.get("BITNET_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", EXIT_USER_ERROR)  # a failed run (NonFiniteLossError) says 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
