"""Write the CPU DPO recipe's preference pairs (recipes/smollm2-dpo-cpu.yaml) from an Alpaca-layout file.

    python scripts/alpaca_pairs.py ../shared/data/alpaca_5000.json ~/.cache/qlora/data/alpaca-concise-pairs.jsonl

Each pair prefers an answer's first sentence to another record's whole answer (qlora.demo.concise_pairs), in the
chat layout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qlora.demo import concise_pairs
from qlora.files import write_text_atomic


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="an Alpaca json file (a list of instruction / input / output)")
    parser.add_argument("output", type=Path, help="the jsonl file to write")
    args = parser.parse_args(argv)
    try:
        records = json.loads(args.source.expanduser().read_text())
    except (OSError, ValueError) as e:
        print(f"alpaca_pairs: cannot read {args.source}: {e}; give an Alpaca json file", file=sys.stderr)
        return 2
    pairs = concise_pairs(records)
    out = args.output.expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, "".join(json.dumps(p) + "\n" for p in pairs))
    print(f"wrote {len(pairs)} pairs of {len(records)} records to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
