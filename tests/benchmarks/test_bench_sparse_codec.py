"""bench_sparse_codec: a row per sparsity with every timing, on a small tensor."""

from __future__ import annotations

from benchmarks import bench_sparse_codec


def test_codec_rows_time_every_call_at_every_sparsity() -> None:
    result = bench_sparse_codec.main(["--numel", "4096", "--repeats", "2", "--no-store"])
    assert [row["sparsity"] for row in result["codec"]] == list(bench_sparse_codec.SPARSITIES)
    for row in result["codec"]:
        assert row["encoding"] in ("bitmap", "indices")
        timings = {k: v for k, v in row.items() if k not in ("sparsity", "encoding")}
        assert len(timings) == 6 and all(v > 0 for v in timings.values())
    assert result["store"] == []
