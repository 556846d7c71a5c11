"""One training stage's loop with its fault handling and progress line (`Stage`), and the loss check."""
import math
import os
import signal
import sys
import time

import torch

from common import dist
from common.checkpoints import IN_PHASE, check_resume_args, run_record, save_state
from common.device import rng_state, set_rng_state
from common.errors import UserError
from common.stop import _STAGES_USED, _STOP_SIGNALS, _stopped


class Stage:
    """The epochs and steps of one training stage (a phase's training, or a finetuning stage after it) with an
    in-phase checkpoint every --checkpoint-minutes at an epoch boundary, and after the current step on SIGTERM /
    Ctrl-C (then `Stopped`). --resume continues there with the numbers of an uninterrupted run: model, optimiser(s),
    scheduler(s) (one object, a list or None), RNG, epoch and step come back and the epoch's data stream is
    replayed. `stage.state` holds anything else the loop needs back; a stage finished before the checkpoint is
    restored whole. Made before the step's CapturedStep, then (lucir.py): `for epoch in stage.epochs()`, `stats =
    stage.running(zeros)`, `for x, y in stage.batches(train_batches(..))`, `check_finite(..)`, `stage.report(..)`.
    """

    def __init__(self, args, label: str, model, optimizer, scheduler, epochs: int):
        self.args, self.label, self.model = args, label, model
        self.optimizers, self.schedulers = ([] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]
                                            for x in (optimizer, scheduler))
        self.total_epochs, self.epoch, self.step, self.seen, self.train_s = epochs, 0, 0, 0, 0.0
        self.state, self.epoch_rng, self.step_rng, self._since = {}, None, None, time.time()
        self.stats = self._saved_stats = None
        self.started, self.tty = time.time(), sys.stdout.isatty()  # for the progress line
        _STAGES_USED.append(label)
        dist.broadcast_state(model)  # torchrun: every rank starts from rank 0's weights (a resume loads the same)
        self.run = run_record(args.out_dir)
        saved = self.run["in_phase"]
        if saved is None:
            return
        check_resume_args(saved["args"], vars(args))
        if label in saved["finished"]:
            done = saved["finished"][label]
            model.load_state_dict(done["model"])
            set_rng_state(done["rng"])
            self.epoch, self.seen, self.train_s, self.state = epochs, done["seen"], done["train_s"], done["state"]
            self.run["finished"][label] = done
            print(f"  {label}: finished before the checkpoint, restored")
        elif saved["stage"] == label:
            model.load_state_dict(saved["model"])
            for obj, state in zip(self.optimizers + self.schedulers, saved["optimizers"] + saved["schedulers"]):
                obj.load_state_dict(state)
            self.run["finished"] = dict(saved["finished"])
            for key in ("epoch", "step", "seen", "train_s", "state", "epoch_rng", "step_rng"):
                setattr(self, key, saved[key])
            self._saved_stats = saved["stats"] if self.step else None
            set_rng_state(self.epoch_rng)
            self.run["in_phase"] = None
            print(f"  {label}: resumed at epoch {self.epoch + 1} step {self.step + 1} (in-phase checkpoint)")

    def epochs(self):
        minutes = getattr(self.args, "checkpoint_minutes", 10.0)
        while self.epoch < self.total_epochs:
            if self.step == 0:
                self.epoch_rng = rng_state()  # the epoch's data stream starts from here
            self._since = time.time()
            yield self.epoch
            self.train_s += time.time() - self._since
            self.epoch, self.step = self.epoch + 1, 0
            if (self.args.out_dir and self.epoch < self.total_epochs  # no folder (a unit test): nothing to save
                    and time.time() - self.run["last_save"] >= 60 * minutes):
                self.epoch_rng = rng_state()
                self.save()
        if self.label not in self.run["finished"]:  # kept until the phase-end checkpoint, for later stages
            self.run["finished"][self.label] = {
                "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()}, "rng": rng_state(),
                "seen": self.seen, "train_s": self.train_s, "state": self.state}

    def running(self, stats: torch.Tensor) -> torch.Tensor:
        """The epoch's running sums (e.g. loss and correct count, added to in place): `stats` itself, holding the
        sums at the checkpoint when resumed inside the epoch, so the epoch's printed loss is complete."""
        if self._saved_stats is not None:
            stats.copy_(self._saved_stats)
            self._saved_stats = None
        self.stats = stats
        return stats

    def batches(self, stream):
        """The batches of one epoch; after each step, stop cleanly if asked to."""
        if self.step:  # resumed inside this epoch: replay the stream to the step reached, then its RNG state
            for _ in range(self.step):
                next(stream)
            set_rng_state(self.step_rng)
        vote = dist.StopVote() if dist.active() else None  # torchrun: every rank stops after the same step
        while True:
            try:
                x, y = next(stream)
            except StopIteration:  # torchrun: rank 0's BN statistics everywhere, the ranks' mean epoch sums
                if vote is not None and vote.last():
                    self._stop()
                dist.broadcast_state(self.model, buffers_only=True)
                dist.average_(self.stats)
                return
            except Exception:  # Ctrl-C also reaches the DataLoader workers, which then exit
                if not _STOP_SIGNALS:
                    raise
                self._stop()
            yield x, y
            self.step, self.seen = self.step + 1, self.seen + len(y)  # torchrun: this process's images
            self.run["steps"] += 1
            limit = getattr(self.args, "stop_after_steps", None)
            if limit is not None and self.run["steps"] >= limit:
                _STOP_SIGNALS.append(signal.SIGTERM)  # the test hook behaves as a real SIGTERM
            stop = vote(bool(_STOP_SIGNALS)) if vote is not None else bool(_STOP_SIGNALS)  # torchrun: all ranks
            if stop:
                self._stop()

    def images_per_s(self) -> float:  # `seen` and `train_s` count across resumes
        return self.seen / max(self.train_s + time.time() - self._since, 1e-9)

    def report(self, epoch: int, text: str):
        """The progress line after `epoch`: `text` (losses, accuracy), the training images/s, time and ETA;
        rewritten in place on a terminal, one line per epoch otherwise."""
        done, elapsed = epoch + 1, time.time() - self.started
        line = (f"  {self.label} epoch {done}/{self.total_epochs} {text} {self.images_per_s():.0f} img/s "
                f"[{elapsed:.0f}s, eta {elapsed / max(done, 1) * (self.total_epochs - done):.0f}s]")
        print("\r" + line if self.tty else line, end="" if self.tty and done < self.total_epochs else "\n", flush=True)

    def _stop(self):
        self.train_s += time.time() - self._since
        self.step_rng = rng_state()
        path = self.save()
        raise _stopped(f"in {self.label}, epoch {self.epoch + 1} after step {self.step}; checkpoint {path}")

    def save(self) -> str:
        path = os.path.join(self.args.out_dir, IN_PHASE)
        save_state(path, {
            "stage": self.label, "epoch": self.epoch, "step": self.step, "seen": self.seen, "train_s": self.train_s,
            "state": self.state, "epoch_rng": self.epoch_rng, "step_rng": self.step_rng,
            "stats": None if self.stats is None else self.stats.detach().cpu(),
            "model": self.model.state_dict(), "optimizers": [o.state_dict() for o in self.optimizers],
            "schedulers": [s.state_dict() for s in self.schedulers], "finished": self.run["finished"],
            "args": vars(self.args)})
        self.run["last_save"] = time.time()
        return path


def check_finite(loss: float, where: str, hint: str = "a lower --lr, or --no-amp"):
    """One line (UserError) when an epoch's loss is NaN or infinite: where (`phase 1 epoch 3`) and what to try."""
    if not math.isfinite(loss):
        raise UserError(f"loss is {'NaN' if math.isnan(loss) else loss} in {where}; the last checkpoint in the run "
                        f"folder is kept (try {hint})")

