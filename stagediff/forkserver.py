"""Imported by the stage forkserver, and only there: preload what stages use, freeze it, exit fast.

A module (not a function) because a `multiprocessing` forkserver can only be told which modules to
import. Importing it anywhere else would freeze that process' objects for good and cut its exit short.
"""

import atexit
import os
import sys

from stagediff.isolation import set_wait_policy

set_wait_policy()  # before torch loads OpenMP, which reads it once

from stagediff.preload import prepare_forkserver  # noqa: E402 (imports torch: after the line above)

prepare_forkserver()


def _exit_now() -> None:
    """The parent has gone (the forkserver's only way to end): exit without tearing torch's modules down.

    That teardown takes ~0.4 s here, all the while holding the parent's stdout and stderr open, so a
    caller that reads them to the end (a pipe, a Prefect worker, a test) waits for it. Registered
    last, so it runs first: multiprocessing's own exit handler has nothing to do in a forkserver.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


atexit.register(_exit_now)
