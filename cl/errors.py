"""Errors a user can fix. `python -m cl` prints the message (one sentence that
names the fix) and exits with status 2, without a traceback."""


class UserError(Exception):
    """Bad input: an option, a missing file, data or weights, a diverging run."""


class Diverged(UserError):
    """The loss became NaN or infinite; `python -m cl` adds the command that starts again with a lower lr."""


def cannot_write(path, reason, run_dir) -> UserError:
    """A file of the run folder could not be written (full disk, read-only folder)."""
    return UserError(f"Cannot write {path} ({reason}); free space or choose a writable run folder "
                     f"(hydra.run.dir=<dir>), then resume with resume={run_dir}.")


class Interrupted(Exception):
    """SIGINT/SIGTERM stopped the run after a checkpoint; `python -m cl` says how to resume."""

    def __init__(self, signum: int, iteration: int, checkpoint, forward=None):
        super().__init__(f"signal {signum} at iteration {iteration}")
        self.signum, self.iteration, self.checkpoint = signum, iteration, checkpoint
        self.forward = forward or (lambda: None)  # hands the signal on (submitit requeues), after the checkpoint
