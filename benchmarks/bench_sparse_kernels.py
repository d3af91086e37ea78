"""Dense matmul on masked weights vs torch.sparse CSR matmul, on this CPU, for the zoo's layers.

A compute node receives a masked weight as surviving values plus an index
(``proto.sparse``). It can either decode it to a dense tensor with zeros and
run the ordinary dense kernels, or build a CSR tensor and run a sparse
matmul. This script times both per layer (forward ``x @ W.T``) at densities
0.5, 0.25 and 0.1. The sparse time includes building the CSR tensor from the
decoded weight, which a node would pay once per layer per pass, as it must
for the dense decode too (``decode`` column, common to both).

    python benchmarks/bench_sparse_kernels.py [--threads 1] [--repeats 20]

A measurement script, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from proto.sparse import decode_sparse, encode_sparse

# (name, out_features, in_features, rows of x per node): mlp-digits at batch 128 / 4 nodes,
# gpt-text (d_model 128, MLP 4x, 64 tokens x 8 sequences per node), gpt-10m (d_model 384).
LAYERS = [
    ("mlp-digits fc1", 256, 64, 32),
    ("mlp-digits fc2", 256, 256, 32),
    ("gpt-text qkv", 384, 128, 512),
    ("gpt-text mlp", 512, 128, 512),
    ("gpt-10m mlp", 1536, 384, 512),
]
DENSITIES = (0.5, 0.25, 0.1)


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (nodes use 1)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    header = f"{'layer':<16} {'density':>7} {'decode':>9} {'dense mm':>9} {'csr build+mm':>13} {'csr/dense':>9}"
    print(header)
    print("-" * len(header))
    for name, out_f, in_f, rows in LAYERS:
        x = torch.randn(rows, in_f, generator=gen)
        for density in DENSITIES:
            weight = torch.randn(out_f, in_f, generator=gen)
            mask = torch.rand(out_f, in_f, generator=gen) >= density
            payload = encode_sparse(weight, mask)
            raw = payload.to_bytes()

            def decode(raw=raw, payload=payload, shape=(out_f, in_f)):
                return decode_sparse(
                    raw, encoding=payload.encoding, index_bytes=payload.index_bytes, shape=shape
                )[0]

            dense_w = decode()
            decode_s = _time(decode, args.repeats)
            dense_s = _time(lambda w=dense_w, x=x: x @ w.T, args.repeats)

            def sparse(w=dense_w, x=x):
                csr = w.to_sparse_csr()
                return torch.sparse.mm(csr, x.T).T

            assert torch.allclose(sparse(), x @ dense_w.T, atol=1e-4)
            sparse_s = _time(sparse, args.repeats)
            print(
                f"{name:<16} {density:>7.2f} {decode_s * 1e6:>7.1f}us {dense_s * 1e6:>7.1f}us "
                f"{sparse_s * 1e6:>11.1f}us {sparse_s / dense_s:>8.2f}x"
            )


if __name__ == "__main__":
    main()
