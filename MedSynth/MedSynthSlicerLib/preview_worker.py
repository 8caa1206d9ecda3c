"""A warm synthesis worker for the fast preview: the model stays loaded between edits.

Run by path with a Python that can import MedSynthLib::

    python preview_worker.py --model MODEL --device auto --precision auto

It reads one JSON request per line on stdin and answers one JSON line (prefixed
``MEDSYNTH_REPLY``) on stdout; log lines go to stderr.

Requests::

    {"id": 1, "cmd": "synthesize", "labels": LABELS, "out": OUT_DIR, "seed": 0}
        full synthesis of a label map, kept in memory as the base of later previews
    {"id": 2, "cmd": "rerender", "labels": LABELS, "out": OUT_DIR, "margin": 24}
        SynthesisEngine.rerender: only the region whose labels changed since the
        last result is synthesised again and blended in
    {"id": 3, "cmd": "quit"}

Each result is written with :func:`MedSynthLib.synthesis.synthesize.write_synthesis`
(t1, t1ce, t2, flair, labels, provenance.json) into a fresh ``OUT_DIR``; the
reply holds the seconds taken and, for ``rerender``, the changed box.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path


def _reply(payload: dict) -> None:
    sys.stdout.write("MEDSYNTH_REPLY " + json.dumps(payload) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args(argv)

    from MedSynthLib.schema.errors import MedSynthError
    from MedSynthLib.schema.labelmap import read_label_map
    from MedSynthLib.synthesis.models import resolve_model
    from MedSynthLib.synthesis.runtime import avoid_hugepage_stalls
    from MedSynthLib.synthesis.synthesize import SynthesisEngine, write_synthesis

    avoid_hugepage_stalls()  # this is MedSynth's own process, not Slicer's
    start = time.perf_counter()
    try:
        engine = SynthesisEngine(resolve_model(args.model), args.device, args.precision,
                                 log=lambda m: print(f"medsynth: {m}", file=sys.stderr, flush=True))
    except MedSynthError as exc:
        _reply({"id": 0, "ok": False, "error": str(exc)})
        return 2
    _reply({"id": 0, "ok": True, "ready": True, "device": engine.device, "precision": engine.synth.precision,
            "seconds": round(time.perf_counter() - start, 3)})

    previous = None
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        request: dict = {}
        try:
            request = json.loads(line)
            cmd = request.get("cmd")
            if cmd == "quit":
                _reply({"id": request.get("id"), "ok": True})
                return 0
            begin = time.perf_counter()
            labelmap = read_label_map(request["labels"])
            if cmd == "synthesize" or (cmd == "rerender" and previous is None):
                result = engine.synthesize(labelmap, seed=int(request.get("seed", 0)))
                box = None
            elif cmd == "rerender":
                changed = labelmap.array != previous.labelmap.array
                box = None
                if changed.any():
                    import numpy as np

                    idx = np.argwhere(changed)
                    box = [idx.min(0).tolist(), (idx.max(0) + 1).tolist()]
                result = engine.rerender(previous, labelmap, margin=int(request.get("margin", 24)))
            else:
                raise ValueError(f"unknown request {cmd!r}")
            write_synthesis(result, Path(request["out"]))
            previous = result
            _reply({"id": request.get("id"), "ok": True, "cmd": cmd, "out": request["out"], "changed_box_kji": box,
                    "seconds": round(time.perf_counter() - begin, 3)})
        except MedSynthError as exc:
            _reply({"id": request.get("id"), "ok": False, "error": str(exc)})
        except Exception as exc:  # report and keep serving
            traceback.print_exc(file=sys.stderr)
            _reply({"id": request.get("id"), "ok": False, "error": f"{type(exc).__name__}: {exc}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
