"""torchrun as the wrappers start it: the same launcher (torch.distributed.run, same flags), without the launcher's
own traceback when a worker stops with an error it has already explained in one line.

    python lib/torchrun.py --standalone --nproc_per_node=8 train_gpt.py [FLAGS...]

train_gpt.py exits with 2 for bad settings, data or checkpoints and with 3 when training diverged, after printing
why; plain torchrun then adds a 30-line traceback of its own. Here those exits end with the worker's status and
nothing more; any other failure (a crash, a signal) keeps torchrun's report of which worker failed and how.
"""

from __future__ import annotations

import sys

EXPLAINED = {2, 3}  # train_gpt.py's exit statuses for errors it has printed


def main(argv: list[str] | None = None) -> int:
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # its "failed (exitcode: N)" line: for the explained exits the worker said it better, for the others the report
    # printed below says it too
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)

    try:
        run(parse_args(sys.argv[1:] if argv is None else argv))
    except ChildFailedError as e:
        _, failure = e.get_first_failure()
        code = failure.exitcode
        if code not in EXPLAINED:
            print(e.format_msg(), file=sys.stderr)
        return code if code > 0 else 128 - code if code < 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
