"""Work done on one thread beside the loop, in order: the run folder's snapshot files.

The loop does not wait for a grid to be encoded or a file to be written (Pillow, zlib and file writes release the
GIL, so on a GPU or a second core the two overlap). What the work raises is raised in the loop's thread, at the
next hand-over or at the end, so a failed write still ends the run with its own clear error.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor


class Background:
    """One worker thread; at most ``most_pending`` pieces of work queued (memory stays bounded where the disk is
    slower than the loop: the loop then waits for the oldest)."""

    def __init__(self, name: str, most_pending: int = 2) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self.pending: deque[Future[None]] = deque()
        self.most_pending = most_pending

    def submit(self, work: Callable[[], None]) -> None:
        """Queue ``work``, first raising what earlier work raised."""
        while self.pending and (self.pending[0].done() or len(self.pending) >= self.most_pending):
            self.pending.popleft().result()
        self.pending.append(self.pool.submit(work))

    def wait(self) -> None:
        """Until everything queued is done; raises the first failure."""
        while self.pending:
            self.pending.popleft().result()

    def close(self) -> None:
        """Let what is queued finish, whatever it raises, and stop the thread; never raises."""
        for future in self.pending:
            future.exception()
        self.pending.clear()
        self.pool.shutdown(wait=True)
