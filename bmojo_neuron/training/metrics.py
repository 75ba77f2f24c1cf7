"""The records of a run: ``metrics.jsonl`` (and TensorBoard when installed), and the loss / recall plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bmojo_neuron.checkpoints.layout import METRICS_FILE
from bmojo_neuron.fsutil import write_text_atomic

TENSORBOARD_DIR = "tensorboard"  # the run directory's TensorBoard event files
_TB_NOTICE_SHOWN = False


class RecordsOnly:
    """The records of a run, kept in memory: the metrics logger of ranks other than 0, which write nothing.

    A provisional record (the partial window a run stopped between log steps logs) stays out
    of the checkpoint (`lasting`): the resumed run logs that window whole, as the
    uninterrupted run does.
    """

    def __init__(self, records: list[dict[str, Any]]) -> None:
        self.records = list(records)
        self.provisional: list[dict[str, Any]] = []

    def log(self, record: dict[str, Any], provisional: bool = False) -> None:
        self.records.append(record)
        if provisional:
            self.provisional.append(record)

    def lasting(self) -> list[dict[str, Any]]:
        """The records a checkpoint keeps: all but the provisional ones."""
        return [r for r in self.records if not any(r is p for p in self.provisional)]

    def close(self) -> None:
        pass


class MetricsLogger(RecordsOnly):
    """Appends records to ``metrics.jsonl`` (and TensorBoard when installed): rank 0's logger.

    On resume the file is rewritten from the checkpoint's records, dropping whatever
    the interrupted run logged after its last checkpoint, and TensorBoard drops its
    events after the checkpoint's step. Provisional records go to ``metrics.jsonl`` only.
    """

    def __init__(self, run_dir: Path, records: list[dict[str, Any]], step: int) -> None:
        super().__init__(records)
        path = run_dir / METRICS_FILE
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in self.records))
        self._file = open(path, "a")
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            # A SummaryWriter's purge_step hides the events at that step and after (torch/utils/tensorboard/writer.py,
            # SummaryWriter.__init__ docstring; tensorboard 2.21 event_accumulator.py `_Purge` keeps step < purge
            # step): the events of the checkpoint's own step are its records and stay.
            self._tb = SummaryWriter(str(run_dir / TENSORBOARD_DIR), purge_step=step + 1 if step else None)
        except ImportError:
            global _TB_NOTICE_SHOWN
            if not _TB_NOTICE_SHOWN:
                print("tensorboard is not installed: skipping TensorBoard logs (metrics.jsonl has them all)")
                _TB_NOTICE_SHOWN = True

    def log(self, record: dict[str, Any], provisional: bool = False) -> None:
        super().log(record, provisional)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None and not provisional:
            prefix = record["type"]
            for key, value in record.items():
                if key not in ("type", "step") and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{prefix}/{key}", value, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def plot_training(records: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """PNG with the training / eval loss curves and, when present, eval MQAR recall."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r["type"] == "train"]
    evals = [r for r in records if r["type"] == "eval"]
    has_acc = any("eval_accuracy" in r for r in evals)
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(10 if has_acc else 5.5, 3.6), squeeze=False)
    ax = axes[0][0]
    curve = "lm_loss" if not train or "lm_loss" in train[0] else "loss"  # a distillation logs hidden_mse instead
    ax.plot([r["step"] for r in train], [r[curve] for r in train], label=f"train {curve.replace('_', ' ')}")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], marker="o", label="eval loss")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="loss")
    ax.legend()
    if has_acc:
        acc = [r for r in evals if "eval_accuracy" in r]
        axes[0][1].plot([r["step"] for r in acc], [r["eval_accuracy"] for r in acc], marker="o",
                        color="tab:green")
        axes[0][1].set(xlabel="step", ylabel="MQAR recall", title="eval recall", ylim=(0, 1.02))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
