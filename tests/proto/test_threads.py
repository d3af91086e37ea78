"""proto/threads.py: layers' threads are reused, the pool grows on demand and shrinks idle."""

from __future__ import annotations

import threading
import time

import pytest

from proto.threads import ThreadReuse
from tests.polling import until

#: How long a test waits for the pool's threads, s.
WAIT_S = 5.0


def _until(predicate) -> bool:
    return until(predicate, WAIT_S)


def test_a_finished_tasks_thread_runs_the_next_one():
    pool = ThreadReuse(idle_s=5.0)
    idents = []
    for _ in range(5):
        task = pool.start(lambda: idents.append(threading.get_ident()))
        task.join(timeout=5)
        assert not task.is_alive()
        assert _until(lambda: pool.num_idle == 1)
    assert len(set(idents)) == 1
    assert pool.num_threads == 1


def test_tasks_that_wait_on_each_other_each_get_a_thread():
    """No task waits for a thread: 8 tasks that all wait for the last one to start finish."""
    pool = ThreadReuse(idle_s=5.0)
    barrier = threading.Barrier(8, timeout=5)
    tasks = [pool.start(barrier.wait) for _ in range(8)]
    for task in tasks:
        task.join(timeout=5)
    assert not any(t.is_alive() for t in tasks)
    assert not barrier.broken
    assert pool.num_threads == 8


def test_join_waits_for_the_task_and_is_alive_says_so():
    pool = ThreadReuse(idle_s=5.0)
    go = threading.Event()
    task = pool.start(go.wait)
    task.join(timeout=0.05)
    assert task.is_alive()
    go.set()
    task.join(timeout=5)
    assert not task.is_alive()


def test_idle_threads_end():
    pool = ThreadReuse(idle_s=0.05)
    tasks = [pool.start(time.sleep, 0.01) for _ in range(4)]
    for task in tasks:
        task.join(timeout=5)
    assert _until(lambda: pool.num_threads == 0)
    assert pool.num_idle == 0
    done = threading.Event()
    pool.start(done.set)  # a new thread again
    assert done.wait(5)


def test_work_handed_over_as_a_thread_times_out_still_runs():
    """The race of a task given to an idle thread just as its idle time ends."""
    pool = ThreadReuse(idle_s=0.001)
    ran = []
    for index in range(300):
        task = pool.start(ran.append, index)
        task.join(timeout=5)
        assert not task.is_alive()
        time.sleep(0.001 * (index % 3))
    assert ran == list(range(300))
    assert _until(lambda: pool.num_threads == 0)


def test_a_failing_task_is_reported_and_its_thread_goes_on(monkeypatch):
    reported = []
    monkeypatch.setattr(threading, "excepthook", lambda args: reported.append(args.exc_value))
    pool = ThreadReuse(idle_s=5.0)

    def fail():
        raise ValueError("layer failed")

    task = pool.start(fail)
    task.join(timeout=5)
    assert not task.is_alive()
    assert _until(lambda: pool.num_idle == 1)
    assert [str(e) for e in reported] == ["layer failed"]
    done = threading.Event()
    pool.start(done.set).join(timeout=5)
    assert done.is_set()
    assert pool.num_threads == 1


@pytest.mark.parametrize("args", [(), (1, 2)])
def test_arguments_are_passed_and_dropped_after_the_run(args):
    pool = ThreadReuse(idle_s=5.0)
    got = []
    task = pool.start(lambda *a: got.append(a), *args)
    task.join(timeout=5)
    assert got == [args]
    assert task._fn is None and task._args is None  # nothing the task held stays referenced


def test_a_reused_thread_takes_each_tasks_name():
    pool = ThreadReuse(idle_s=5.0)
    names = []
    for name in ("node-0-layer", "swarmx-pass-read"):
        pool.start(lambda: names.append(threading.current_thread().name), name=name).join(5)
        assert _until(lambda: pool.num_idle == 1)
    assert names == ["node-0-layer", "swarmx-pass-read"]


def test_several_joiners_all_return_once_the_task_has_run():
    pool = ThreadReuse(idle_s=5.0)
    go = threading.Event()
    task = pool.start(go.wait)
    joined = []
    joiners = [threading.Thread(target=lambda: (task.join(), joined.append(1))) for _ in range(3)]
    for joiner in joiners:
        joiner.start()
    time.sleep(0.05)
    assert joined == []
    go.set()
    for joiner in joiners:
        joiner.join(timeout=5)
    assert joined == [1, 1, 1]
    task.join()  # a finished task joins at once
