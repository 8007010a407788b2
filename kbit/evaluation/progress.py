"""Progress of a long evaluation, logged at most every ``interval_s`` seconds.

lm-eval's own tqdm bars go to stderr, one bar per request type, and say nothing about how many
tasks (or quantization configs) are left. On a cluster the log file is all one sees, so this
logs one line with tasks done / total, model rows (batched forward sequences) done / total and
an estimated time left, from the rate of rows since the current task began.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("kbit.evaluation")


class Progress:
    """Counts tasks and forward rows; ``tick`` logs when ``interval_s`` has passed."""

    def __init__(self, n_tasks: int, interval_s: float = 10.0, label: str = "") -> None:
        self.n_tasks = int(n_tasks)
        self.interval_s = float(interval_s)
        self.label = label
        self.tasks_done = 0
        self.task_name = ""
        self.rows_total = 0
        self.rows_done = 0
        self._task_start = time.perf_counter()
        self._last_log = self._task_start

    def start_task(self, name: str) -> None:
        """Begin a task; the row total is added as each request type is scored."""
        self.task_name = name
        self.rows_total = 0
        self.rows_done = 0
        self._task_start = time.perf_counter()
        self._last_log = self._task_start

    def add_rows(self, n: int) -> None:
        """Announce ``n`` more rows that the current task will score."""
        self.rows_total += int(n)

    def tick(self, n: int) -> None:
        """Record ``n`` scored rows and log if the interval has passed."""
        self.rows_done += int(n)
        now = time.perf_counter()
        if now - self._last_log >= self.interval_s:
            self._last_log = now
            self.log_line(now)

    def end_task(self) -> None:
        """Finish the current task and log its wall time."""
        self.tasks_done += 1
        self.rows_done = max(self.rows_done, self.rows_total)
        self.log_line(time.perf_counter(), final=True)

    def eta_s(self, now: float) -> float | None:
        """Seconds left in the current task at the current rate (None before the first row)."""
        elapsed = now - self._task_start
        if self.rows_done <= 0 or elapsed <= 0:
            return None
        rate = self.rows_done / elapsed
        return max(self.rows_total - self.rows_done, 0) / rate

    def log_line(self, now: float, final: bool = False) -> None:
        eta = self.eta_s(now)
        eta_txt = "done" if final else ("?" if eta is None else f"{eta:.0f} s")
        log.info(
            "%stask %s: tasks %d/%d, rows %d/%d, %.1f s elapsed, time left %s",
            f"{self.label} " if self.label else "",
            self.task_name,
            self.tasks_done,
            self.n_tasks,
            self.rows_done,
            self.rows_total,
            now - self._task_start,
            eta_txt,
        )
