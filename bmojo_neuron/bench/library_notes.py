"""Warnings the model libraries log while a suite runs, kept for the report instead of landing in its table.

On a CPU (or without the ``mamba_ssm`` / ``causal_conv1d`` packages) transformers runs its Mamba models on
their reference PyTorch path and says so once per function and process, through its ``transformers`` logger
(transformers 5.25, ``integrations/hub_kernels.py:607-613``, ``logger.warning_once``). Each probe process says
it again, so a suite printed them between its rows. They matter, since the hf-mamba baselines are timed on that
path, so they are not dropped: `keeping_library_warnings` collects each message once, the suite stores them in
the report's ``library_notes``, and `bench` prints one line that says so after the table.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

LIBRARY_LOGGER = "transformers"  # the logger every transformers module's logger propagates to


class _Collector(logging.Handler):
    """Keeps each message once, in the order first seen."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message not in self.messages:
            self.messages.append(message)


@contextmanager
def keeping_library_warnings() -> Iterator[list[str]]:
    """Inside the block, the warnings of transformers' logger go into the yielded list (each message once)
    instead of its handlers (stderr); the handlers are back afterwards. A level below WARNING set on the logger
    (``TRANSFORMERS_VERBOSITY``) is left alone: only warnings and worse are kept."""
    logger = logging.getLogger(LIBRARY_LOGGER)
    collector = _Collector()
    handlers = logger.handlers[:]
    for handler in handlers:
        logger.removeHandler(handler)
    logger.addHandler(collector)
    try:
        yield collector.messages
    finally:
        logger.removeHandler(collector)
        for handler in handlers:
            logger.addHandler(handler)


def merge_notes(notes: list[str], more: list[str]) -> None:
    """Add to `notes` the messages of `more` it does not hold yet, in order."""
    notes.extend(message for message in more if message not in notes)


def notes_line(notes: list[str]) -> str | None:
    """The one line `bench` prints about the kept messages, or None when there are none."""
    if not notes:
        return None
    fallbacks = [message.split("`")[1] for message in notes
                 if "falling back to its reference PyTorch implementation" in message and message.count("`") >= 2]
    what = (f"its reference PyTorch path for {', '.join(fallbacks)} (the Hugging Face baselines are timed on it)"
            if len(fallbacks) == len(notes) else f"{len(notes)} warning{'s' if len(notes) > 1 else ''}")
    return f"  note: transformers logged {what}; the messages are in the report's library_notes"
