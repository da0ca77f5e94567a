"""A closed pipe ends a command quietly, as Unix tools do: `conceptlens-client explain ... --json | head` and
`conceptlens ... | head` exit 141 without a message instead of printing "[Errno 32] Broken pipe".

Both CLIs use it (`conceptlens` imports only this module of the client package, which costs nothing to import).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable


def quiet_closed_pipe(main: Callable[[], int]) -> int:
    """Run a CLI's `main` and return its exit code; when stdout's reader has gone away (EPIPE), stop without a
    message and return 141 (128 + SIGPIPE, what a shell reports for a tool ended by a closed pipe). SIGPIPE stays
    ignored, as Python sets it, rather than SIG_DFL: the same process writes to sockets (gRPC, /metrics), where
    a peer that hangs up must not kill it."""
    try:
        try:
            return main()
        finally:
            sys.stdout.flush()  # a closed pipe shows up here, not in the interpreter's flush at exit
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # what is still buffered goes nowhere at exit
        return 128 + signal.SIGPIPE
