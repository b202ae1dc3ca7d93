"""``horovodrun`` as the worker pool starts it: ``python -m tasks.training.horovodrun ARGS``
is Horovod's own ``horovodrun ARGS`` (:func:`horovod.runner.launch.run_commandline`),
started like the stages and the workers: in a pipeline run, as a child of the run's fork
server (:mod:`tasks.core.fork_server`).

On every launch ``horovodrun`` checks that Horovod was built with Gloo by importing
``horovod.torch``, hence torch, in a forked process: 1.3 s of the 1.6 s it took to start
the workers (measured). As a child of the fork server it finds torch imported, and the
same check takes milliseconds; it still runs, so a Horovod without Gloo is still refused.
"""

from __future__ import annotations

import sys

from tasks.core.fork_server import run_forked

MODULE = "tasks.training.horovodrun"


def main() -> int:
    from horovod.runner.launch import run_commandline

    sys.argv[0] = "horovodrun"  # its usage and error lines name the command users know
    return run_commandline() or 0


if __name__ == "__main__":
    from tasks.core.processes import exit_process

    run_forked(MODULE)
    exit_process(main())
