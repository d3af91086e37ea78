"""``python -m emulator.zoo [--json PATH]``: every zoo model with its size, as the emulator streams it.

For each model: trainable parameters and streamed layers, counted on the model
``wafer train`` would build (default sizes, seed 0, default backend), and its
default data set.
"""

from __future__ import annotations

import argparse
import sys

from core.atomic import write_json_atomic
from emulator.config import load_config
from emulator.table import format_table
from emulator.zoo.registry import ZOO


def zoo_rows() -> list[dict]:
    from emulator.prepare import prepare_layers

    rows = []
    for name, entry in ZOO.items():
        layers, _dataset = prepare_layers(load_config(overrides={"model.name": name}))
        rows.append(
            {
                "name": name,
                "num_params": sum(
                    p.numel() for layer in layers for p in layer.parameters() if p.requires_grad
                ),
                "num_layers": len(layers),
                "data": entry.data.name,
                "description": entry.description,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emulator.zoo", description=__doc__)
    parser.add_argument("--json", metavar="PATH", help="write the rows as JSON (atomically)")
    args = parser.parse_args(argv)
    rows = zoo_rows()
    print(
        format_table(
            ["name", "params", "layers", "data", "description"],
            [
                (r["name"], f"{r['num_params']:,}", r["num_layers"], r["data"], r["description"])
                for r in rows
            ],
            align="lrrll",
        )
    )
    if args.json:
        write_json_atomic(args.json, {"models": rows})
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
