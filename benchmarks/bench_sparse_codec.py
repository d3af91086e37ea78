"""The sparse codec and MemoryX's masked update: time per call, by kept positions and by
numpy boolean indexing (the way the codec gathered and scattered before), side by side.

For one weight of ``--numel`` entries at each sparsity, it times, single-threaded,
medians of ``--repeats`` calls:

- ``encode``: ``proto.sparse.encode_sparse`` (what MemoryX sends a masked weight as);
- ``decode``: ``decode_sparse`` of that payload (what a node does per pass);
- ``grad encode`` / ``grad decode``: ``encode_masked_values`` / ``decode_masked_values``
  (a node's gradient; MemoryX reading it);
- ``boolean gather`` / ``boolean scatter``: the numpy boolean indexing those four
  did per call before (the ``~mask`` array, then ``values[kept]`` or ``dense[kept] = v``).

Then one Adam update of gpt-10m's layers through ``memoryx.store.ParameterStore``,
dense and at sparsity 0.9 (``update_kept``: the kept entries only).

    python benchmarks/bench_sparse_codec.py [--numel 1048576] [--repeats 20] [--no-store]

A measurement script, not a test: it asserts nothing about time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from proto.sparse import (
    decode_masked_values,
    decode_sparse,
    encode_masked_values,
    encode_sparse,
)

SPARSITIES = (0.5, 0.9, 0.99)


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up (and a mask's positions, found once per mask)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def codec_rows(numel: int, repeats: int) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(numel, generator=gen)
    for sparsity in SPARSITIES:
        mask = torch.rand(numel, generator=gen) < sparsity
        payload = encode_sparse(weight, mask)
        raw, values = payload.to_bytes(), encode_masked_values(weight, mask)
        storage = weight.numpy()

        def boolean_gather(mask=mask, storage=storage):
            return storage[~mask.numpy()]

        def boolean_scatter(mask=mask, values=values):
            dense = np.zeros(numel, dtype=np.float32)
            dense[~mask.numpy()] = np.frombuffer(values, dtype=np.float32)
            return dense

        timings = {
            "encode": lambda mask=mask: encode_sparse(weight, mask).to_bytes(),
            "decode": lambda p=payload, raw=raw: decode_sparse(
                raw, encoding=p.encoding, index_bytes=p.index_bytes, shape=(numel,)
            ),
            "grad encode": lambda mask=mask: encode_masked_values(weight, mask),
            "grad decode": lambda mask=mask, v=values: decode_masked_values(v, mask),
            "boolean gather": boolean_gather,
            "boolean scatter": boolean_scatter,
        }
        row = {"sparsity": sparsity, "encoding": payload.encoding}
        row.update({name: _median_ms(fn, repeats) for name, fn in timings.items()})
        rows.append(row)
    return rows


def store_rows(steps: int = 5) -> list[dict]:
    """ms per step of ``apply_gradients`` over gpt-10m's layers, dense and sparsity 0.9."""
    from emulator.config import load_config  # the top floor, for the zoo model only
    from emulator.prepare import prepare_layers, sparsity_named_shapes
    from memoryx.store import ParameterStore

    config = load_config(overrides={"model.name": "gpt-10m", "sparsity.sparsity": 0.9})
    layers, _ = prepare_layers(config)
    weights = [{n: p.detach().clone() for n, p in layer.named_parameters()} for layer in layers]
    grads = [{n: torch.randn_like(p) for n, p in layer.items()} for layer in weights]
    rows = []
    for label, sparsity in (
        ("dense", None),
        ("sparsity 0.9", config.sparsity.build(sparsity_named_shapes(layers))),
    ):
        store = ParameterStore(weights, config.optimizer.build(), sparsity=sparsity)
        times = []
        for step in range(steps + 1):
            started = time.perf_counter()
            for index in reversed(range(len(weights))):
                store.apply_gradients(index, step, grads[index])
            store.commit(step)
            times.append(time.perf_counter() - started)
        kept = sum(store.num_kept(i) for i in range(len(weights)))
        rows.append(
            {"store": label, "kept": kept, "ms_per_step": statistics.median(times[1:]) * 1e3}
        )
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=1 << 20)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-store", action="store_true", help="skip the gpt-10m update")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    codec = codec_rows(args.numel, args.repeats)
    names = [k for k in codec[0] if k not in ("sparsity", "encoding")]
    print(f"ms per call, {args.numel:,} entries, 1 thread (median of {args.repeats})")
    print(f"{'sparsity':>8} {'index':>8} " + " ".join(f"{n:>15}" for n in names))
    for row in codec:
        cells = " ".join(f"{row[n]:>15.3f}" for n in names)
        print(f"{row['sparsity']:>8} {row['encoding']:>8} {cells}")
    store = [] if args.no_store else store_rows()
    for row in store:
        print(
            f"gpt-10m Adam update, {row['store']}: {row['ms_per_step']:.1f} ms per step "
            f"({row['kept']:,} entries kept)"
        )
    return {"codec": codec, "store": store}


if __name__ == "__main__":
    main()
