"""How a run's process ends: `run_main` turns a UserError into one line and exit code 2; SIGTERM and Ctrl-C
finish the current training step, write a checkpoint and print how to resume (exit 143 / 130)."""
import os
import shlex
import signal
import sys

from common import dist
from common.errors import UserError


class Stopped(BaseException):  # BaseException, like KeyboardInterrupt: no `except Exception` swallows it
    """SIGTERM or Ctrl-C: the current step finished and a checkpoint was written; `code` is the exit status."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


_STOP_SIGNALS = []  # signals received; the training loop checks it after every step (Stage.batches)
_STAGES_USED = []  # non-empty once a training loop runs through Stage, i.e. can stop after a step


def _request_stop(signum, frame):
    name = signal.Signals(signum).name
    if _STOP_SIGNALS or not _STAGES_USED:  # a second signal, or no Stage loop: stop at once
        raise Stopped(128 + signum, f"stopped by {name}; the last checkpoint in the run folder is kept; rerun "
                      "with --resume")
    _STOP_SIGNALS.append(signum)
    if dist.is_main():  # torchrun passes the signal to every rank
        print(f"\n{name}: finishing the current step, then writing a checkpoint (send it again "
              "to stop at once)", file=sys.stderr, flush=True)


def run_main(main):
    """Call `main()` as the module docstring says. Under torchrun the process ends through `dist.exit_now` (no
    interpreter teardown: see there why)."""
    previous = {s: signal.signal(s, _request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    code = 0
    try:
        main()
        dist.close(wait=True)
    except UserError as e:
        if dist.is_main():  # under torchrun every rank meets the same error; rank 0 says it
            print(f"error: {e}", file=sys.stderr)
        code = 2
    except Stopped as e:
        if dist.is_main():
            print(str(e), file=sys.stderr)
        code = e.code
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint in the run folder is kept; rerun with --resume", file=sys.stderr)
        code = 130
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _STOP_SIGNALS.clear()
        dist.close()
    if dist.launched():
        dist.exit_now(code)
    if code:
        sys.exit(code)


def _stopped(where: str) -> Stopped:
    signum = _STOP_SIGNALS[0] if _STOP_SIGNALS else signal.SIGTERM
    _STOP_SIGNALS.clear()  # the request is served (matters only to several runs in one process, e.g. tests)
    argv = sys.argv[1:] + ([] if "--resume" in sys.argv else ["--resume"])
    argv = [a for i, a in enumerate(argv) if a != "--stop-after-steps" and argv[i - 1:i] != ["--stop-after-steps"]]
    return Stopped(128 + signum, f"stopped by {signal.Signals(signum).name} {where}\ncontinue with: "
                   f"{shlex.join(dist.launcher() + [os.path.basename(sys.argv[0])] + argv)}")
