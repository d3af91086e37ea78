"""memoryx.actor: the MemoryX process's allocator policy follows its storage."""

from __future__ import annotations

from pathlib import Path

import pytest

from memoryx import actor
from memoryx.config import MemoryXConfig
from memoryx.optim import Optimizer
from proto.rpc import Security

SECURITY = Security.generate()


@pytest.mark.parametrize("tiered", [False, True])
def test_freed_memory_is_kept_only_without_a_ram_budget(monkeypatch, tmp_path: Path, tiered):
    """In RAM, every update's new version reuses the last one's freed memory; with a RAM
    budget the C library must give it back (kept memory would count against the budget)."""
    calls = []
    monkeypatch.setattr(actor, "keep_freed_memory", lambda: calls.append(True))
    memoryx = (
        MemoryXConfig(num_servers=1, ram_budget_bytes=10**6, spill_dir=str(tmp_path))
        if tiered
        else MemoryXConfig()
    )
    served = actor.MemoryXActor(
        Optimizer.Config(),
        host="127.0.0.1",
        chunk_bytes=1 << 16,
        security=SECURITY,
        checkpoint_dir=None,
        memoryx=memoryx,
    )
    try:
        assert served.get_address().startswith("127.0.0.1:")
    finally:
        served.stop()
    assert calls == ([] if tiered else [True])
