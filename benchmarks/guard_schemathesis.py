"""10,000 requests generated from the guard's OpenAPI document with schemathesis: no 5xx.

The target of tests/test_guard_schemathesis.py (a few hundred cases in the normal suite) at
full size: the same guard (a digits model, a detector with review and reject bands, a
fallback model, an admin+predict key), served by uvicorn on 127.0.0.1 behind the catch-all,
fed generated cases in rounds (one hypothesis seed per round) until ``--cases`` requests were
sent. Writes the count per operation and status, and every 5xx with a curl command that
reproduces it, to ``benchmarks/results/guard_schemathesis.json``.

    python benchmarks/guard_schemathesis.py --cases 10000 \\
        --out benchmarks/results/guard_schemathesis.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from bench_attacks import git_info, pkg_version  # noqa: E402

from guard_helpers import fuzz_guard_api  # noqa: E402
from test_guard_schemathesis import fuzz_target  # noqa: E402

sys.path.insert(0, str(HERE))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=10_000)
    ap.add_argument("--per-round", type=int, default=200, help="examples per operation a round")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    from advguard.guard.app import create_app

    t0 = time.time()
    counts: Counter[tuple[str, int]] = Counter()
    failures: list[dict] = []
    rounds = 0
    with tempfile.TemporaryDirectory(prefix="guard_schemathesis_") as td:
        g, key = fuzz_target(Path(td))
        app = create_app(g)
        try:
            while sum(counts.values()) < args.cases:
                c, f = fuzz_guard_api(app, key, examples_per_operation=args.per_round, seed=rounds)
                counts.update(c)
                failures += f
                rounds += 1
                print(f"round {rounds}: {sum(counts.values())} cases, {len(failures)} 5xx",
                      flush=True)  # fmt: skip
        finally:
            g.close()
    total = sum(counts.values())
    n5xx = sum(n for (_op, s), n in counts.items() if s >= 500)
    by_status = Counter()
    for (_op, s), n in counts.items():
        by_status[str(s)] += n
    result = {
        "schema": "advguard-guard-schemathesis/1",
        "cases": total,
        "rounds": rounds,
        "count_5xx": n5xx,
        "pass": n5xx == 0 and total >= args.cases,
        "by_status": dict(sorted(by_status.items())),
        "by_operation": {f"{op} -> {s}": n for (op, s), n in sorted(counts.items())},
        "failures": failures[:50],
        "schemathesis": pkg_version("schemathesis"),
        "hypothesis": pkg_version("hypothesis"),
        "git": {k: v for k, v in git_info().items() if k != "source_sha256_16"},
        "seconds": round(time.time() - t0, 1),
    }
    print(json.dumps({k: result[k] for k in ("cases", "count_5xx", "by_status", "pass")}))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
