"""Render docs/figures/slicer_workflow.png from a real MRML scene, offscreen (no Slicer application).

The Slicer module's Logic runs on the PyPI slicer-core libraries: a BraTS 2021
case is loaded through storage nodes, its label map prepared as a segmentation
(CSF, GM, WM, NCR, ED, ET), the tumour rotated and scaled as the interaction
handles would, and T1/T1ce/T2/FLAIR synthesised by ``medsynth synthesize`` in a
subprocess; the scene is then rendered with VTK offscreen (EGL).

    .venv/bin/python docs/figures/make_slicer_workflow.py --model MODEL [--case CASE_DIR] [-o PNG]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "MedSynth"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # slicer_render.py, the figure's renderer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model name or folder for medsynth synthesize")
    parser.add_argument("--case", type=Path, default=REPO.parent / "shared" / "data" / "brats2021" / "cases" /
                        "BraTS2021_00000")
    parser.add_argument("-o", "--output", type=Path, default=REPO / "docs" / "figures" / "slicer_workflow.png")
    parser.add_argument("--max-kb", type=int, default=290, help="palette-quantise the PNG to stay under this size")
    args = parser.parse_args()

    from MedSynthLib.edits import rotation_ras, tumour_centre
    from MedSynthLib.schema.grid import lps_to_ras
    from MedSynthLib.synthesis.models import resolve_model
    from MedSynthSlicerLib import mrml
    from MedSynthSlicerLib.logic import WorkflowLogic
    from MedSynthSlicerLib.parameters import GenerateOptions
    from slicer_render import render_scene_figure

    scene, _logics = mrml.create_headless_scene()
    logic = WorkflowLogic(scene, work_dir=tempfile.mkdtemp(prefix="medsynth-figure-"))
    logic.log.connect(lambda line: print(line) if "%|" not in line else None)
    nodes = logic.load_case(args.case)
    seg = logic.prepare(nodes["t1"], nodes["tumour"], "brats2021", {m: nodes[m] for m in ("t1ce", "t2", "flair")})
    labels = logic.labelmap(seg)
    centre = lps_to_ras(tumour_centre(labels))
    linear = rotation_ras((0.0, 0.0, 25.0)) @ np.diag([1.1, 1.1, 1.1])
    matrix = np.eye(4)
    matrix[:3, :3] = linear
    matrix[:3, 3] = centre - linear @ centre
    edited = logic.transform_tumour(seg, matrix)
    model = resolve_model(args.model)
    outputs = logic.generate(seg, GenerateOptions(model=args.model, device="auto"))
    edits = ", ".join(r["name"] for r in edited.history[1:])
    captions = {m: f"{t} synthetic" for m, t in (("t1", "T1"), ("t1ce", "T1ce"), ("t2", "T2"), ("flair", "FLAIR"))}
    path, backend = render_scene_figure(
        seg, outputs, edited.array, args.output, size=(1200, 520), captions=captions,
        title=f"MRML segmentation of a BraTS case\ntumour edited: {edits}")
    _shrink(path, args.max_kb)
    print(f"{path}: {path.stat().st_size // 1024} KB, offscreen backend {backend}, model {model.name}")
    logic.cleanup()
    return 0


def _shrink(path: Path, max_kb: int) -> None:
    """Palette-quantise the PNG (256 colours) when it is larger than ``max_kb``."""
    if path.stat().st_size <= max_kb * 1024:
        return
    from PIL import Image

    image = Image.open(path).convert("RGB")
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)


if __name__ == "__main__":
    sys.exit(main())
