from __future__ import annotations

import logging

log = logging.getLogger("cl")


class WandbLogger:
    """Mirrors events to Weights & Biases with the real client; `mode=offline` by
    default (no account needed; `wandb sync` uploads later). Any failure, at start
    or later, switches it off with one warning and the run goes on."""

    def __init__(self, project: str = "cl", mode: str = "offline", entity: str | None = None,
                 name: str | None = None, tags=None, dir: str | None = None, run_config: dict | None = None,
                 init_timeout: float = 30.0):
        self.run = None
        self.task_aware = False  # from the run_start event: the run's primary accuracy is the task-aware one
        try:
            import wandb

            self.run = wandb.init(project=project, entity=entity, name=name, tags=list(tags or []),
                                  mode=mode, dir=dir, config=run_config, reinit="finish_previous",
                                  settings=wandb.Settings(init_timeout=init_timeout))
        except Exception as e:  # noqa: BLE001 - wandb must never kill a run
            reason = " ".join(str(e).split())  # one line, whatever wandb's message looks like
            log.warning("wandb could not start (%s: %s); the run continues without it.", type(e).__name__, reason)

    def log(self, event: dict) -> None:
        if self.run is None:
            return
        kind = event.get("event")
        step = event.get("iteration")
        if kind == "train":
            self.run.log({"train/loss": event["loss"], "train/lr": event.get("lr"), "experience": event["experience"]}, step=step)
        elif kind == "run_start":  # which accuracy the metrics use: acc_exp<j> is that one
            self.task_aware = (event.get("protocol") or {}).get("accuracy") == "task-aware"
        elif kind == "eval" and "loss" in event:  # a token stream: losses, per domain and held-out domain
            tag = "full" if event.get("full") else "subset"
            where = f"exp{event['eval_experience']}" if "eval_experience" in event else f"held_out_{event.get('held_out')}"
            self.run.log({f"eval_{tag}/loss_{where}": event["loss"],
                          f"eval_{tag}/token_accuracy_{where}": event.get("token_accuracy")}, step=step)
        elif kind == "eval":
            tag, j = "full" if event.get("full") else "subset", event["eval_experience"]
            aware = self.task_aware and "accuracy_task_aware" in event
            data = {f"eval_{tag}/acc_exp{j}": event["accuracy_task_aware"] if aware else event["accuracy"]}
            if "accuracy_task_aware" in event:
                data[f"eval_{tag}/acc_task_aware_exp{j}"] = event["accuracy_task_aware"]
                data[f"eval_{tag}/acc_task_agnostic_exp{j}"] = event["accuracy"]
            self.run.log(data, step=step)
        elif kind == "run_end":
            for k, v in (event.get("metrics") or {}).items():
                self.run.summary[k] = v

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
