"""The game day (``advguard gameday``) at full size over several seeds.

Each seed trains the demo CNN on its own 1400 shuffled digits (calibration traffic for the
k-NN detector) and runs the drill of :func:`advguard.guard.gameday.run_gameday`: Square (Linf
0.1) and HopSkipJump attackers, the Jacobian extraction attacker and 20 benign clients each
replaying the other 397 digits, all at once against a local guard. The in-suite version is
tests/test_guard_acceptance.py (one seed).

    python benchmarks/bench_gameday.py --seeds 3 --out benchmarks/results/gameday.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from advguard.guard.gameday import GamedayConfig, demo_setup, run_gameday


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--attack-images", type=int, default=10)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    runs = []
    for seed in range(args.seeds):
        t0 = time.time()
        data = demo_setup(seed=seed, epochs=15)
        rep = run_gameday(data, GamedayConfig(seed=seed, attack_images=args.attack_images))
        doc = rep.to_dict()
        doc["seconds"] = round(time.time() - t0, 1)
        runs.append(doc)
        for a in doc["attackers"]:
            print(
                f"seed {seed} {a['name']:20s} detected at {a['queries_to_detect']} "
                f"({a['detector']}), {a['seconds_to_detect']} s; blocked after "
                f"{a['queries_answered_before_block']} answered, {a['seconds_to_mitigate']} s",
                flush=True,
            )
        b = doc["benign"]
        print(
            f"seed {seed} benign: {b['flagged_clients']}/{b['clients']} flagged, "
            f"{b['errors']}/{b['requests']} refused; passed={doc['passed']}",
            flush=True,
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
