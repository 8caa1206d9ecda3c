"""Offscreen VTK rendering of a MedSynth scene (the README figure; no Slicer views needed).

The left panel renders the label segmentation's closed surfaces (grey-matter
hull translucent, tumour classes in their colours) as MRML produces them; the
right panels show one axial slice per synthetic contrast through the tumour,
taken from the volume nodes' voxels and IJK-to-RAS matrices, with the tumour
label outlines.  The render window is offscreen (EGL, else OSMesa, else the
platform default).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

import vtk
from vtkmodules.util import numpy_support

from MedSynthSlicerLib import mrml


def offscreen_render_window(size: Sequence[int]) -> tuple[Any, str]:
    """An offscreen render window: (window, backend name).

    Raises:
        RuntimeError: no offscreen OpenGL context can be created here.
    """
    candidates = []
    try:
        from vtkmodules.vtkRenderingOpenGL2 import vtkEGLRenderWindow

        candidates.append(("EGL", vtkEGLRenderWindow))
    except ImportError:
        pass
    try:
        from vtkmodules.vtkRenderingOpenGL2 import vtkOSOpenGLRenderWindow

        candidates.append(("OSMesa", vtkOSOpenGLRenderWindow))
    except ImportError:
        pass
    candidates.append(("default", vtk.vtkRenderWindow))
    errors = []
    for name, cls in candidates:
        try:
            window = cls()
            window.SetOffScreenRendering(1)
            window.SetSize(int(size[0]), int(size[1]))
            window.Render()
            if window.IsCurrent() or window.SupportsOpenGL():
                return window, name if name != "default" else type(window).__name__
        except Exception as exc:  # noqa: BLE001 - try the next backend
            errors.append(f"{name}: {exc}")
    raise RuntimeError("no offscreen OpenGL render window (" + "; ".join(errors) + ")")


def oriented_axial_slice(array: np.ndarray, ijk_to_ras: np.ndarray, centre_ras: Sequence[float]
                         ) -> tuple[np.ndarray, tuple[float, float]]:
    """The slice through ``centre_ras`` closest to axial, rows anterior->posterior, columns patient right->left.

    Returns:
        (2D array with row 0 at the top, (column spacing, row spacing) in mm)
    """
    matrix = np.asarray(ijk_to_ras, float)
    directions = matrix[:3, :3]
    spacing = np.linalg.norm(directions, axis=0)
    slice_axis = int(np.argmax(np.abs(directions[2, :] / spacing)))
    others = [a for a in range(3) if a != slice_axis]
    h_axis = max(others, key=lambda a: abs(directions[0, a] / spacing[a]))
    v_axis = next(a for a in others if a != h_axis)
    ijk = np.linalg.solve(matrix, np.append(np.asarray(centre_ras, float), 1.0))[:3]
    index = int(np.clip(round(ijk[slice_axis]), 0, array.shape[2 - slice_axis] - 1))
    plane = np.take(array, index, axis=2 - slice_axis)  # remaining numpy axes, in (k, j, i) order
    remaining = [a for a in (2, 1, 0) if a != slice_axis]  # IJK axes of the plane's numpy axes
    plane = np.transpose(plane, (remaining.index(v_axis), remaining.index(h_axis)))
    if directions[0, h_axis] > 0:  # column 0 must be the patient's right (radiological view)
        plane = plane[:, ::-1]
    if directions[1, v_axis] > 0:  # row 0 must be anterior
        plane = plane[::-1, :]
    return np.ascontiguousarray(plane), (float(spacing[h_axis]), float(spacing[v_axis]))


def _grey(plane: np.ndarray, mask: np.ndarray) -> np.ndarray:
    values = plane[mask] if mask.any() else plane.ravel()
    low, high = np.percentile(values, [1.0, 99.5]) if values.size else (0.0, 1.0)
    grey = np.clip((plane - low) / max(high - low, 1e-6), 0.0, 1.0)
    return np.repeat((grey * 255)[..., None], 3, axis=2)


def _outline(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask)


def _image_actor(rgb: np.ndarray, spacing: tuple[float, float]) -> vtk.vtkImageActor:
    rgb = np.ascontiguousarray(np.flipud(rgb).astype(np.uint8))  # VTK's y axis points up
    image = vtk.vtkImageData()
    image.SetDimensions(rgb.shape[1], rgb.shape[0], 1)
    image.SetSpacing(spacing[0], spacing[1], 1.0)
    scalars = numpy_support.numpy_to_vtk(rgb.reshape(-1, 3), deep=True, array_type=vtk.VTK_UNSIGNED_CHAR)
    scalars.SetNumberOfComponents(3)
    image.GetPointData().SetScalars(scalars)
    actor = vtk.vtkImageActor()
    actor.GetMapper().SetInputData(image)
    actor.InterpolateOn()
    return actor


def _text(text: str, size: int, position: tuple[float, float], bold: bool = False,
          justification: str = "left") -> vtk.vtkTextActor:
    actor = vtk.vtkTextActor()
    actor.SetInput(text)
    prop = actor.GetTextProperty()
    prop.SetFontSize(size)
    prop.SetColor(1.0, 1.0, 1.0)
    prop.SetBold(bold)
    prop.SetFontFamilyToArial()
    if justification == "center":
        prop.SetJustificationToCentered()
    actor.GetPositionCoordinate().SetCoordinateSystemToNormalizedViewport()
    actor.GetPositionCoordinate().SetValue(*position)
    return actor


def segment_surfaces(segmentation: Any) -> dict[str, vtk.vtkPolyData]:
    """Closed-surface polydata (RAS) of every segment, created by MRML's converter."""
    segmentation.CreateClosedSurfaceRepresentation()
    name = "Closed surface"
    out = {}
    seg = segmentation.GetSegmentation()
    for segment_id in seg.GetSegmentIDs():
        polydata = seg.GetSegment(segment_id).GetRepresentation(name)
        if polydata is not None and polydata.GetNumberOfPoints() > 0:
            out[seg.GetSegment(segment_id).GetName()] = polydata
    return out


def render_scene_figure(segmentation: Any, volumes: Mapping[str, Any], labels: np.ndarray, path: str | Path,
                        size: tuple[int, int] = (1200, 520), title: str | None = None,
                        captions: Mapping[str, str] | None = None) -> tuple[Path, str]:
    """Render the workflow figure from the MRML scene offscreen and write a PNG.

    Args:
        segmentation: the MedSynth label segmentation node (closed surfaces are made from it).
        volumes: ``{"t1": node, "t1ce": node, "t2": node, "flair": node}`` (synthetic outputs).
        labels: the label map ``array[k, j, i]`` on the volumes' grid (outlines and slice position).
        path: output PNG.

    Returns:
        (the PNG path, the offscreen backend used)
    """
    from MedSynthLib.schema.grid import mask_box
    from MedSynthLib.schema.labels import LABEL_INFO, MODALITIES, MODALITY_TITLES, Label, brain_mask, tumour_mask

    path = Path(path)
    window, backend = offscreen_render_window(size)
    reference = next(iter(volumes.values()))
    matrix = mrml.ijk_to_ras(reference)
    tumour = tumour_mask(labels)
    focus = np.argwhere(tumour if tumour.any() else brain_mask(labels)).mean(axis=0)
    centre_ras = (matrix @ np.append(focus[::-1], 1.0))[:3]

    # --- 3D: closed surfaces of the segmentation --------------------------------------------
    renderer3d = vtk.vtkRenderer()
    renderer3d.SetViewport(0.0, 0.0, 0.42, 1.0)
    renderer3d.SetBackground(0.07, 0.08, 0.12)
    window.AddRenderer(renderer3d)
    surfaces = segment_surfaces(segmentation)
    style = {"GM": 0.10, "WM": 0.0, "CSF": 0.0, "ED": 0.35, "ET": 1.0, "NCR": 1.0}
    for label in Label:
        if label == Label.BACKGROUND:
            continue
        info = LABEL_INFO[label]
        polydata = surfaces.get(info.short_name)
        if polydata is None or style[info.short_name] <= 0:
            continue
        mapper = vtk.vtkPolyDataMapper()
        mapper.SetInputData(polydata)
        mapper.ScalarVisibilityOff()
        actor = vtk.vtkActor()
        actor.SetMapper(mapper)
        actor.GetProperty().SetColor(*(info.color if label != Label.GM else (0.85, 0.82, 0.80)))
        actor.GetProperty().SetOpacity(style[info.short_name])
        renderer3d.AddActor(actor)
    camera = renderer3d.GetActiveCamera()
    camera.SetFocalPoint(*centre_ras)
    camera.SetPosition(*(centre_ras + np.array([260.0, 320.0, 260.0])))
    camera.SetViewUp(0.0, 0.0, 1.0)
    renderer3d.ResetCamera()
    camera.Zoom(1.25)
    renderer3d.AddViewProp(_text(title or "label segmentation (MRML closed surfaces)", 14, (0.03, 0.90), bold=True))
    renderer3d.AddViewProp(_text("tumour: NCR red, ED green, ET yellow; grey-matter hull", 12, (0.03, 0.03)))

    # --- 2D: one axial slice per contrast, tumour outlines ------------------------------------
    label_plane, _ = oriented_axial_slice(labels, matrix, centre_ras)
    brain = brain_mask(label_plane)
    crop = mask_box(brain, margin=4) if brain.any() else (slice(None), slice(None))
    label_plane, brain = label_plane[crop], brain[crop]
    rows, cols = 2, 2
    for n, modality in enumerate(MODALITIES):
        node = volumes.get(modality)
        if node is None:
            continue
        plane, spacing = oriented_axial_slice(mrml.array_from_volume(node).astype(np.float32),
                                              mrml.ijk_to_ras(node), centre_ras)
        plane = plane[crop]
        rgb = _grey(plane, brain)
        for label in (Label.ED, Label.ET, Label.NCR):
            edge = _outline(label_plane == label)
            rgb[edge] = np.asarray(LABEL_INFO[label].color) * 255
        renderer = vtk.vtkRenderer()
        r, c = divmod(n, cols)
        x0 = 0.42 + c * 0.29
        y0 = (rows - 1 - r) * 0.5
        renderer.SetViewport(x0, y0, x0 + 0.29, y0 + 0.5)
        renderer.SetBackground(0.0, 0.0, 0.0)
        actor = _image_actor(rgb, spacing)
        renderer.AddActor(actor)
        renderer.ResetCamera()
        cam = renderer.GetActiveCamera()
        cam.ParallelProjectionOn()
        bounds = actor.GetBounds()
        aspect = (0.29 * size[0]) / (0.5 * size[1])
        cam.SetParallelScale(1.04 * max((bounds[3] - bounds[2]) / 2.0, (bounds[1] - bounds[0]) / 2.0 / aspect))
        caption = (captions or {}).get(modality, f"{MODALITY_TITLES[modality]} (synthetic)")
        renderer.AddViewProp(_text(caption, 14, (0.04, 0.9), bold=True))
        window.AddRenderer(renderer)

    window.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.ReadFrontBufferOff()
    grab.Update()
    writer = vtk.vtkPNGWriter()
    writer.SetCompressionLevel(9)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer.SetFileName(str(path))
    writer.SetInputConnection(grab.GetOutputPort())
    writer.Write()
    window.Finalize()
    return path, backend
