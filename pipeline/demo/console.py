"""What the demo shows in the terminal: one line per stage and per long step, nothing else.

Ray, Tune, MLflow and the workers write start-up banners, warnings and progress tables to the
process's stdout and stderr (file descriptors 1 and 2, inherited by every process Ray starts).
:class:`Console` points both descriptors at ``<out>/demo.log`` for the whole run and keeps a
copy of the terminal for the demo's own lines; on an error the log's last lines are shown.

Example:
    >>> # with Console(Path("runs/demo/demo.log")) as console:
    >>> #     with console.stage("generate", "small WeChat-format logs"):
    >>> #         ...
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: the descriptor of the terminal while a Console is open (module-level so that the Tune
#: callback, which Tune pickles with its experiment state, holds no file object)
_TERMINAL_FD: int | None = None


def say(text: str) -> None:
    """Write a line to the terminal (the real stdout while a :class:`Console` captures the rest)."""
    data = (text + "\n").encode()
    if _TERMINAL_FD is None:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    else:
        os.write(_TERMINAL_FD, data)


class Console:
    """Captures fds 1 and 2 into ``log`` while open; :meth:`stage` prints numbered stage lines.

    Args:
        log: the file that receives everything else (appended to).
        total: the number of stages (for ``[i/total]``).
        capture: False leaves stdout/stderr alone (``--verbose``).
    """

    def __init__(self, log: Path, total: int, capture: bool = True) -> None:
        self.log, self.total, self.capture = log, total, capture
        self.index = 0
        self._saved: tuple[int, int] | None = None
        self._streams: tuple[Any, Any] = (sys.stdout, sys.stderr)

    def __enter__(self) -> "Console":
        global _TERMINAL_FD
        if self.capture:
            sys.stdout.flush()
            sys.stderr.flush()
            self.log.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            self._saved = (os.dup(1), os.dup(2))
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(fd)
            _TERMINAL_FD = self._saved[0]
            # Python's own streams too, where something replaced them (a test runner's capture)
            self._streams = (sys.stdout, sys.stderr)
            sys.stdout = open(os.dup(1), "w", buffering=1, closefd=True)  # noqa: SIM115
            sys.stderr = open(os.dup(2), "w", buffering=1, closefd=True)  # noqa: SIM115
        return self

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
        global _TERMINAL_FD
        if self._saved is None:
            return
        for stream in (sys.stdout, sys.stderr):
            stream.flush()  # left open: a logging handler made meanwhile may still write to it (into the log)
        sys.stdout, sys.stderr = self._streams
        os.dup2(self._saved[0], 1)
        os.dup2(self._saved[1], 2)
        for fd in self._saved:
            os.close(fd)
        self._saved, _TERMINAL_FD = None, None
        if kind is not None and not issubclass(kind, KeyboardInterrupt):
            tail = self.tail(25)
            if tail:
                print(f"--- the last lines of {self.log} ---\n{tail}", file=sys.stderr)

    def tail(self, n: int) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    @contextlib.contextmanager
    def stage(self, name: str, what: str) -> Iterator[dict[str, str]]:
        """``[i/N] name  what`` now, ``done in X s: summary`` at the end (``summary``: what the
        body puts in the yielded dict under ``"summary"``)."""
        self.index += 1
        say(f"[{self.index}/{self.total}] {name:<10} {what}")
        result: dict[str, str] = {}
        t = time.perf_counter()
        yield result
        summary = result.get("summary", "")
        say(f"{'':>6}{'':<10} done in {time.perf_counter() - t:.1f} s" + (f": {summary}" if summary else ""))


def trial_progress(stage: str) -> Any:
    """A Tune callback that prints one line per evaluation of a trial (its model, strategy,
    epoch and validation score) and one when it ends."""
    from ray.tune import Callback

    class TrialProgress(Callback):
        def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any) -> None:
            if result.get("final"):
                return  # the run's closing report repeats its last evaluation
            score = result.get("valid/score")
            text = f"valid score {score:.4f}" if isinstance(score, float) else "evaluated"
            epoch = result.get("epoch")
            epoch = int(epoch) if isinstance(epoch, float) and epoch.is_integer() else epoch
            say(f"{'':>17}{stage} {_label(trial.config)}  epoch {epoch}: {text}")

        def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            last = trial.last_result or {}
            how = "finished" if last.get("final") else "stopped early (ASHA)"
            say(f"{'':>17}{stage} {_label(trial.config)}  {how}")

        def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            say(f"{'':>17}{stage} {_label(trial.config)}  FAILED (see the log)")

    return TrialProgress()


def _label(config: dict[str, Any] | None) -> str:
    config = config or {}
    return f"{config.get('model', '?')}/{config.get('strategy', '?')}"
