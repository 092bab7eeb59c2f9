"""Print a seeded uniform random sample of mutmut's mutant names (one per line).

A full mutmut run of every configured file (about 3200 mutants) takes hours on a shared 2-core
machine; a uniform sample estimates the overall mutation score (report it with its binomial
confidence interval) and shows typical survivors. The names come from ``mutants/**/*.meta``,
which the first seconds of any ``mutmut run`` write (mutant generation precedes testing).

Usage (see docs/mutation.md)::

    python scripts/mutation_sample.py --n 220 --seed 15 > /tmp/sample.txt
    mutmut run --max-children 2 $(cat /tmp/sample.txt)
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def mutant_names(mutants_dir: Path) -> list[str]:
    """Every mutant name in ``mutants_dir`` (sorted).

    Args:
        mutants_dir: mutmut's working copy (``mutants/``).
    """
    names: list[str] = []
    for meta in sorted(mutants_dir.rglob("*.meta")):
        names.extend(json.loads(meta.read_text())["exit_code_by_key"])
    return sorted(names)


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments and print the sample."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, required=True, help="sample size")
    parser.add_argument("--seed", type=int, default=15)
    parser.add_argument("--mutants", type=Path, default=Path("mutants"))
    parser.add_argument("--exclude", type=Path, action="append", default=[],
                        help="a file of names already sampled (drawn from the rest)")
    args = parser.parse_args(argv)
    skip = {line.strip() for path in args.exclude for line in path.read_text().splitlines()}
    names = [n for n in mutant_names(args.mutants) if n not in skip]
    if not names:
        raise SystemExit(f"no mutants under {args.mutants}/: start `mutmut run` once to generate them")
    for name in sorted(random.Random(args.seed).sample(names, min(args.n, len(names)))):
        print(name)


if __name__ == "__main__":
    main()
