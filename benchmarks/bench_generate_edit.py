"""CPU seconds of ``medsynth generate``'s edit stage per case, two checkouts alternately.

The edit stage (drawing case i's label map from the cached sources with its random edits, its
privacy status and tumour statistics) is single-threaded NumPy/SciPy, so its CPU time is a
fair measure even on a shared machine; running the checkouts alternately, several rounds, in
fresh processes, spreads the load of the machine over both.  Each round runs ``--n`` cases
(seed 0, default sampler config, the real sources of ``bench_generate.py``) in a child process
per checkout and reports CPU seconds per case.

Usage::

    nice -n 10 .venv/bin/python benchmarks/bench_generate_edit.py --code before=/tmp/before after=. \\
        --rounds 3 --n 16 --json docs/benchmarks/generate_edit_stage_ab.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, sys, time
from pathlib import Path
import numpy as np
from MedSynthLib.generate.sources import find_sources, prepare_case, prepare_tumour, template_source, tumour_stats
from MedSynthLib.generate.sampler import Sources, check_config_fits_sources, draw_case, load_config, privacy
from MedSynthLib.schema.labels import Label
root, cache, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
cases, tumours = find_sources([root / "brats2021" / "cases", root / "brats2021" / "seg_only", root / "brats2020_seg"])
sources = Sources([prepare_case(c, cache) for c in cases] + [prepare_tumour(t, cache) for t in tumours]
                  + [template_source()])
config = check_config_fits_sources(load_config(None), sources.all, "default")
draw_case(n + 1, 0, config, sources)  # warm: imports, template, first reads
start = time.process_time()
draws = 0
for i in range(n):
    labelmap, record = draw_case(i, 0, config, sources)
    privacy(record, labelmap, sources)
    tumour_stats(labelmap.array, labelmap.grid, labelmap.array > Label.BACKGROUND)
    draws += 1 + record["attempt"]
print(json.dumps({"cpu_s_per_case": (time.process_time() - start) / n, "draws": draws,
                  "load": os.getloadavg()[0]}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--code", nargs="+", required=True, help="NAME=CHECKOUT pairs")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "medsynth-bench-anatomy")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    data = Path(os.environ.get("MEDSYNTH_DATA", REPO.parent / "shared" / "data"))
    checkouts = dict(item.split("=", 1) for item in args.code)
    results: dict[str, list[dict]] = {name: [] for name in checkouts}
    for _ in range(args.rounds):
        for name, code in checkouts.items():
            env = dict(os.environ, PYTHONPATH=str(Path(code).resolve()), OMP_NUM_THREADS="1")
            out = subprocess.run([sys.executable, "-c", CHILD, str(data), str(args.cache), str(args.n)], env=env,
                                 capture_output=True, text=True, check=True)
            results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(name, results[name][-1], flush=True)
    report = {
        "benchmark": "generate edit stage (draw + privacy + tumour statistics), CPU seconds per case",
        "command": "nice -n 10 python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
        "cases_per_round": args.n,
        "rounds": results,
        "median_cpu_s_per_case": {k: round(statistics.median(r["cpu_s_per_case"] for r in v), 3)
                                  for k, v in results.items()},
        "min_cpu_s_per_case": {k: round(min(r["cpu_s_per_case"] for r in v), 3) for k, v in results.items()},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
