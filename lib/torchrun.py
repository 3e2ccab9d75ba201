"""torchrun as the wrappers start it: the same launcher (torch.distributed.run, same flags), without the launcher's
own traceback when a worker stops with an error it has already explained in one line, or at a signal.

    python lib/torchrun.py --standalone --nproc_per_node=8 train_gpt.py [FLAGS...]

train_gpt.py exits with 2 for bad settings, data or checkpoints and with 3 when training diverged, after printing
why; plain torchrun then adds a 30-line traceback of its own. Here those exits end with the worker's status and
nothing more; any other failure (a crash) keeps torchrun's report of which worker failed and how.

A SIGINT or SIGTERM to the launcher reaches the workers, which finish their step, save a checkpoint and say so
(train_gpt.py's stop). Plain torchrun gives them 30 s before it kills them, less than a slow step and a save can
take, and then ends in a traceback with exit 1; here they get SHUTDOWN_TIMEOUT_S (unless --shutdown-timeout or
TORCH_ELASTIC_SHUTDOWN_TIMEOUT says otherwise), and the launcher exits 128 + the signal, quietly. A supervisor's
own grace period (docker stop: 10 s, Kubernetes and Slurm: 30 s) still bounds the whole stop.
"""

from __future__ import annotations

import sys

EXPLAINED = {2, 3}  # train_gpt.py's exit statuses for errors it has printed
SHUTDOWN_TIMEOUT_S = 300  # how long workers may take to stop at a signal before torchrun kills them


def with_shutdown_timeout(args: list[str]) -> list[str]:
    """args with --shutdown-timeout SHUTDOWN_TIMEOUT_S first, unless they or the environment set one."""
    import os

    given = any(a.split("=")[0] in ("--shutdown-timeout", "--shutdown_timeout") for a in args)
    if given or os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT"):
        return args
    return [f"--shutdown-timeout={SHUTDOWN_TIMEOUT_S}", *args]


def main(argv: list[str] | None = None) -> int:
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # its "failed (exitcode: N)" line: for the explained exits the worker said it better, for the others the report
    # printed below says it too; and "Received SIGTERM death signal, shutting down workers", which the workers say
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    logging.getLogger("torch.distributed.elastic.agent.server.api").setLevel(logging.ERROR)

    try:
        run(parse_args(with_shutdown_timeout(sys.argv[1:] if argv is None else argv)))
    except ChildFailedError as e:
        _, failure = e.get_first_failure()
        code = failure.exitcode
        if code not in EXPLAINED:
            print(e.format_msg(), file=sys.stderr)
        return code if code > 0 else 128 - code if code < 0 else 1
    except SignalException as e:  # the workers have stopped (each said how), or were killed after the timeout
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
