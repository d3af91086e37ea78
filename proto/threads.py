"""Threads for a stream's layers, reused: ``start(fn, *args)`` runs ``fn`` on an idle
thread of this process, or on a new one when none is idle.

A pass stream runs each of its layers on a thread of its own (the layer waits for its
turn, its children or its reduced gradient while the next one streams in). A new
``threading.Thread`` per layer costs more than the layer's messages: ``Thread.start``
creates an OS thread and then waits until that thread has been scheduled and has taken
the GIL, and on a machine with more busy threads than cores that wait is a scheduling
round trip in the middle of every layer's path (the reader cannot read the next layer
meanwhile). Here an idle thread takes the work from a queue and the caller goes on at
once. The pool grows as needed, so a layer never waits for another to give a thread
back (no layer can deadlock on the pool), and a thread idle for ``IDLE_S`` ends.
"""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Callable
from typing import Any

#: Seconds an idle thread waits for work before it ends.
IDLE_S = 30.0


class Task:
    """One ``start``ed call: ``join`` and ``is_alive`` as a ``threading.Thread``'s."""

    __slots__ = ("_done", "_running", "_fn", "_args", "name")

    def __init__(self, fn: Callable[..., Any], args: tuple, name: str):
        self._fn = fn
        self._args = args
        self.name = name
        self._done = False
        # Held until the call has run: a joiner takes and gives it back (a bare lock, not an
        # Event's condition and two locks, for one task per layer).
        self._running = threading.Lock()
        self._running.acquire()

    def run(self) -> None:
        try:
            self._fn(*self._args)
        finally:
            self._fn = self._args = None  # what it referred to is freed now
            self._done = True
            self._running.release()

    def is_alive(self) -> bool:
        return not self._done

    def join(self, timeout: float | None = None) -> None:
        if self._done:
            return
        if self._running.acquire(timeout=-1 if timeout is None else max(timeout, 0.0)):
            self._running.release()


class _Worker:
    def __init__(self, pool: ThreadReuse):
        self._pool = pool
        self.inbox: queue.SimpleQueue[Task] = queue.SimpleQueue()

    def loop(self, task: Task) -> None:
        thread = threading.current_thread()
        while True:
            thread.name = task.name  # what a thread dump (py-spy) shows it doing
            # An exception ends only its task (as it would end a thread of its own), after
            # the usual report; the thread goes on serving.
            try:
                task.run()
            except BaseException:
                args = (*sys.exc_info(), thread)
                threading.excepthook(threading.ExceptHookArgs(args))
            task = self._pool._idle_wait(self)
            if task is None:
                return


class ThreadReuse:
    """A pool of threads that grows on demand and shrinks when idle (see the module)."""

    def __init__(self, *, idle_s: float = IDLE_S, name: str = "layer"):
        self._idle_s = idle_s
        self._name = name
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._num_threads = 0

    def start(self, fn: Callable[..., Any], *args: Any, name: str | None = None) -> Task:
        task = Task(fn, args, name or self._name)
        with self._lock:
            worker = self._idle.pop() if self._idle else None
            if worker is None:
                self._num_threads += 1
        if worker is not None:
            worker.inbox.put(task)
        else:
            worker = _Worker(self)
            threading.Thread(target=worker.loop, args=(task,), name=task.name, daemon=True).start()
        return task

    def _idle_wait(self, worker: _Worker) -> Task | None:
        """The worker's next task; None once it has been idle for ``idle_s`` (it ends)."""
        with self._lock:
            self._idle.append(worker)
        try:
            return worker.inbox.get(timeout=self._idle_s)
        except queue.Empty:
            pass
        with self._lock:
            if worker in self._idle:
                self._idle.remove(worker)
                self._num_threads -= 1
                return None
        # Taken from the idle list just now: its task is on the way.
        return worker.inbox.get()

    @property
    def num_threads(self) -> int:
        """Threads alive in the pool, idle or busy."""
        with self._lock:
            return self._num_threads

    @property
    def num_idle(self) -> int:
        with self._lock:
            return len(self._idle)


#: The process's pool for the layers of pass streams (compute nodes, SwarmX nodes).
LAYER_THREADS = ThreadReuse()


def start(fn: Callable[..., Any], *args: Any, name: str | None = None) -> Task:
    """Run ``fn(*args)`` on a thread of the process's pool (``LAYER_THREADS``)."""
    return LAYER_THREADS.start(fn, *args, name=name)


__all__ = ["IDLE_S", "LAYER_THREADS", "Task", "ThreadReuse", "start"]
