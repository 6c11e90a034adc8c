"""A job's processes as threads of the test process, with a barrier that behaves as a real one.

`run_as_processes(work, count)` calls `work(p, barrier)` on `count` threads; `barrier(name)` blocks
until every thread has reached `name` and raises TimeoutError after `timeout` seconds (as a job's
hosts do when one of them is lost). A thread's exception of one of the `expected` types becomes its
result; any other propagates from the thread and fails the test through the missing result.
"""

from __future__ import annotations

import threading
from typing import Any, Callable


def run_as_processes(work: Callable[[int, Callable[[str], None]], Any], count: int, *, timeout: float = 60,
                     expected: tuple[type[BaseException], ...] = (), join_timeout: float = 300) -> list[Any]:
    arrived: dict[str, int] = {}
    cond = threading.Condition()

    def barrier(name: str) -> None:
        with cond:
            arrived[name] = arrived.get(name, 0) + 1
            cond.notify_all()
            if not cond.wait_for(lambda: arrived[name] % count == 0, timeout=timeout):
                raise TimeoutError(name)

    results: list[Any] = [None] * count

    def process(p: int) -> None:
        try:
            results[p] = work(p, barrier)
        except (TimeoutError, *expected) as e:
            results[p] = e

    threads = [threading.Thread(target=process, args=(p,)) for p in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(join_timeout)
    return results
