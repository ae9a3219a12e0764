"""Console view of a run: an event-log observer that draws a progress bar and report lines.

    log = EventLog(path, observers=[ConsoleObserver()])

It reads only the event records (see events.py), like every other observer. A run_failed
event draws nothing: the error it records is printed once, by the CLI (mipo_mlx/cli.py).
"""

import sys
import time

BAR_WIDTH = 24
REPORTED_METRICS = ("loss", "rewards/margins", "rewards/accuracies", "learning_rate", "tokens_per_second")


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def format_metrics(record: dict) -> str:
    shown = [f"{name} {record[name]:.4g}" for name in REPORTED_METRICS if isinstance(record.get(name), (int, float))]
    split = "" if record.get("split", "train") == "train" else f"[{record['split']}] "
    return f"{split}step {record.get('step', '?')}  " + "  ".join(shown)


def round_line(record: dict) -> str:
    """A round_finished event in one line: the round's held-out DPO loss, reward accuracy, probe loops and echoes."""
    held_out, selected = record.get("held_out") or {}, record.get("selected") or {}
    shown = [f"{label} {held_out[name]:.3g}" for name, label in (
        ("loss", "held-out loss"), ("rewards/accuracies", "reward accuracy"),
        ("generation/repetition_loop", "probe loops"), ("generation/context_echo", "probe echoes"))
        if isinstance(held_out.get(name), (int, float))]
    shown.append(f"adapter of step {selected.get('step', '?')} ({selected.get('selected_by', '?')})")
    return f"round {record['round']} of {record['rounds']}: " + ", ".join(shown)


def progress_line(record: dict) -> str:
    done, total = record["done"], record.get("total") or 0
    filled = int(BAR_WIDTH * done / total) if total else 0
    bar = "█" * filled + "░" * (BAR_WIDTH - filled)
    parts = [f"{record['stage']:>9} {bar} {done}/{total} {record.get('unit', '')}"]
    if record.get("rate"):
        parts.append(f"{record['rate']:.2f} {record.get('unit', '')}/s")
    if record.get("tokens_per_second"):
        parts.append(f"{record['tokens_per_second']:.0f} tok/s")
    if record.get("rank_tokens_per_second"):  # a run on several ranks (distributed.py): each one's share
        parts.append(f"{record['ranks']} ranks " + " + ".join(f"{rate:.0f}" for rate in record["rank_tokens_per_second"]))
    parts.append(f"ETA {format_duration(record.get('eta_seconds'))}")
    return "  ".join(parts)


class ConsoleObserver:
    """Prints events to a stream: a live bar on a terminal, a line every 10 s otherwise."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self._bar_shown = False
        self._last_line_at = 0.0

    def _print(self, text: str) -> None:
        if self._bar_shown:
            self.stream.write("\r\033[K")
            self._bar_shown = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def __call__(self, record: dict) -> None:
        event = record["event"]
        if event == "progress":
            line = progress_line(record)
            if self.live:
                self.stream.write("\r\033[K" + line)
                self.stream.flush()
                self._bar_shown = True
            elif time.monotonic() - self._last_line_at >= 10 or record["done"] == record.get("total"):
                self._last_line_at = time.monotonic()
                self._print(line)
        elif event == "metrics":
            self._print(format_metrics(record))
        elif event == "stage_started":
            self._print(f"== {record['stage']}: {record.get('total', '?')} {record.get('unit', '')}")
        elif event == "stage_finished":
            self._print(f"== {record['stage']} done in {format_duration(record.get('seconds'))}")
        elif event == "round_started":
            self._print(f"==== round {record['round']} of {record['rounds']}")
        elif event == "round_finished":
            self._print(f"==== {round_line(record)}")
        elif event == "checkpoint_saved":
            self._print(f"checkpoint at step {record['step']}: {record['path']}")
        elif event == "run_finished":
            self._print(f"run {record['status']} in {format_duration(record.get('seconds'))}")
        elif event == "run_failed" and self._bar_shown:
            # The CLI prints the error next: on a line of its own, not after the bar.
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._bar_shown = False
