"""Fill the `# memory:` and `# time:` lines of every recipe's header (and the catalog table in docs/recipes.md) from
`qlora plan`, so they cannot go stale.

    python scripts/recipe_headers.py           # rewrite the headers
    python scripts/recipe_headers.py --check   # exit 1 if a header differs from what the plan says

memory: the plan's estimated peak on a GPU with bfloat16 (the recipe as written) when memory is short: the least
the recipe needs, with train.gradient_checkpointing=auto recomputing every layer it can; on a larger GPU auto
recomputes fewer and uses more. time: for GPU recipes, the training FLOPs (frozen-base basis, see
qlora.plan.flops_per_token, with the layers auto recomputes on an H200's 139 GiB) at an assumed 30% model FLOPs
utilisation of an H200's 989 dense bf16 TFLOP/s: an estimate, not a measurement. Demo recipes keep their measured
CPU times.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from qlora.composition import compose_config, recipe_paths
from qlora.plan import gib, plan
from qlora.recipes import read_header, set_header_field

H200_BF16_FLOPS = 989e12
H200_MEMORY_GIB = 139  # as torch.cuda reports it
ASSUMED_MFU = 0.30
DEMO_TIMES = {  # measured on the 2-core CPU this project is developed on
    "default": "about 1 min on a 2-core CPU",
    "tiny-alpaca": "about 3 min on a 2-core CPU",
    "smollm2-alpaca": "about 8 min on a 2-core CPU",
    "smollm2-dpo-cpu": "about 9 min on a 2-core CPU",
}


OWN_MODEL = ("custom",)  # the user's model and data: nothing to plan until they are given


def header_values(name: str) -> dict[str, str]:
    if name in OWN_MODEL:
        return {"memory": "?", "time": "?"}
    config = compose_config([f"recipe={name}", "output_dir=unused"])
    estimate = plan(config, "cuda")
    values = {"memory": gib(estimate.total_bytes)}
    if name in DEMO_TIMES:
        values["time"] = DEMO_TIMES[name]
    else:
        t = config.train
        on_h200 = plan(replace(config, train=replace(t, memory_limit_gb=H200_MEMORY_GIB)), "cuda")
        tokens = t.max_steps * t.grad_accum_steps * on_h200.tokens
        hours = tokens * on_h200.flops_per_token / (H200_BF16_FLOPS * ASSUMED_MFU) / 3600
        if config.objective.name.value == "dpo" and not config.objective.precompute_reference:
            hours *= 1.5  # the reference forward in each step: half as much again as a frozen-base forward + backward
        values["time"] = f"~{hours:.1f} h on an H200 (estimated)"
    return values


DOCS = Path(__file__).resolve().parents[1] / "docs" / "recipes.md"


def catalog_doc(text: str, values: dict[str, dict[str, str]]) -> str:
    """docs/recipes.md with the memory and time cells (the last two) of each recipe's catalog row replaced."""
    lines = []
    for line in text.splitlines(keepends=True):
        name = line.split("`")[1] if line.startswith("| `") else None
        if name in values:
            cells = line.rstrip("\n").split(" | ")
            cells[-2:] = [values[name]["memory"], values[name]["time"] + " |"]
            line = " | ".join(cells) + "\n"
        lines.append(line)
    return "".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report stale headers instead of rewriting them")
    args = parser.parse_args()
    stale, everything = [], {}
    for name, path in recipe_paths().items():
        header = read_header(path)
        everything[name] = header_values(name)
        for key, value in everything[name].items():
            if header.get(key) == value:
                continue
            if args.check:
                stale.append(f"{path.name}: {key}: {header.get(key)!r}, the plan says {value!r}")
            else:
                set_header_field(path, key, value)
                print(f"{path.name}: {key}: {value}")
    doc = catalog_doc(DOCS.read_text(), everything)
    if doc != DOCS.read_text():
        if args.check:
            stale.append("docs/recipes.md: the catalog table's memory / time columns")
        else:
            DOCS.write_text(doc)
            print("docs/recipes.md: catalog table updated")
    if stale:
        print("stale recipe headers (run python scripts/recipe_headers.py):\n  " + "\n  ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
