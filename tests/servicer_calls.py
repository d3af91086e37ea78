"""Counting the calls that servicers answer, by method, for the tests that check how many
calls a step makes."""

from __future__ import annotations

import inspect
from collections import Counter


def count_servicer_calls(monkeypatch, methods: dict[type, tuple[str, ...]]) -> Counter:
    """Wrap each named method of each servicer class (instances built afterwards count);
    the counts, by method name, start at 0 for every one. A method keeps its kind (sync,
    coroutine or async generator: an event-loop server runs only the last two)."""
    counts: Counter = Counter({name: 0 for names in methods.values() for name in names})
    for cls, names in methods.items():
        for name in names:
            method = getattr(cls, name)
            if inspect.isasyncgenfunction(method):

                async def counted(self, request, context, method=method, name=name):
                    counts[name] += 1
                    async for answer in method(self, request, context):
                        yield answer

            elif inspect.iscoroutinefunction(method):

                async def counted(self, request, context, method=method, name=name):
                    counts[name] += 1
                    return await method(self, request, context)

            else:

                def counted(self, request, context, method=method, name=name):
                    counts[name] += 1
                    return method(self, request, context)

            monkeypatch.setattr(cls, name, counted)
    return counts
