"""DICOM export of a synthetic case: four MR Image Storage series and a DICOM Segmentation.

``T1/ T1ce/ T2/ FLAIR/`` - one MR Image Storage series each (``IM0001.dcm`` ...,
one file per slice along the grid's third axis), all in one study and one frame of
reference; ``SEG/seg.dcm`` - the tumour labels as a DICOM Segmentation (highdicom,
BINARY, segments 1 NCR, 2 ED, 3 ET) referencing the T1 series, synthetic only when MedSynth drew
the tumour (otherwise the segments say where it came from: :func:`tumour_source`, and their algorithm
type and family say how it was made: :func:`segment_algorithm`).

Every export gets fresh UIDs.  Each file has Synthetic Data (0008,001C) YES, a
De-identification Method that says whether the case is anonymous (Patient Identity Removed
YES only then: otherwise the pixels carry a patient's anatomy, tumour shape or scan),
a generated patient name (``SYNTHETIC^<case id>`` only for an anonymous case, ``NOT-ANONYMOUS^`` or
``PATIENT-SCAN^`` otherwise) and ID (the case id: ``SYNTH-`` only for an anonymous case, see
:func:`~MedSynthLib.export.package.default_case_id`), and the sanitised provenance summarised
in the Contributing Equipment Sequence (and, for the MR images, Image Comments, with
the case's privacy statement).  The MR images have Image Type DERIVED\\SECONDARY and
int16 pixels (:mod:`.encoding`).  Dates and times are those of the export (UTC); there
is no acquisition date.

Geometry is kept exactly: position, orientation and spacing of every voxel.  DICOM
readers order slices along the normal of the image plane (row x column direction), so
a grid whose third axis points the other way (a left-handed direction matrix, common in
radiological-convention NIfTI) reads back with its slices reversed - the same voxels at
the same places, indexed from the other end.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .. import __version__
from ..schema.grid import Grid
from ..schema.labels import MODALITIES, Label
from .encoding import encode_intensities, patient_scan
from .sanitise import exported_privacy, provenance_summary


#: DICOM series: folder name, series description stem, series number.
DICOM_SERIES: Mapping[str, tuple[str, str, int]] = {
    "t1": ("T1", "T1", 1),
    "t1ce": ("T1ce", "T1ce post-contrast", 2),
    "t2": ("T2", "T2", 3),
    "flair": ("FLAIR", "FLAIR", 4),
}
SEG_SERIES_NUMBER = 100

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
#: LO (64 characters at most); how close the case stays to a real patient is in Image Comments.
DEIDENTIFICATION_METHOD = "Synthetic data (MedSynth): no source identifiers; see comments"
#: The same for a patient's scan with a region inpainted (``synthesize --context``): the identifiers are removed,
#: the images are the patient's.
PATIENT_SCAN_DEIDENTIFICATION_METHOD = "Identifiers removed (MedSynth); patient scan: NOT anonymous"
#: A whole synthetic case whose label map is a patient's anatomy (``medsynth labels`` of a real case), and one whose
#: label map may carry a patient (a real tumour's shape, or a map of unknown source): every image synthetic, the
#: patient recognisable from them.
PATIENT_ANATOMY_DEIDENTIFICATION_METHOD = "Synthetic images (MedSynth), a patient's anatomy: NOT anonymous"
NOT_ANONYMOUS_DEIDENTIFICATION_METHOD = "Synthetic images (MedSynth), may be a patient's: NOT anonymous"

#: Tumour segments of the DICOM Segmentation: number, MedSynth label, label, name (its description adds where the
#: tumour came from, :func:`tumour_source`).
SEG_SEGMENTS: tuple[tuple[int, Label, str, str], ...] = (
    (1, Label.NCR, "NCR", "Necrotic / non-enhancing tumour core"),
    (2, Label.ED, "ED", "Peritumoural oedema"),
    (3, Label.ET, "ET", "Enhancing tumour"),
)
#: Patient name family of a case whose images are synthetic: an anonymous one, and one whose anatomy or tumour is (or
#: may be) a patient's.  A PACS worklist shows the name first, and "SYNTHETIC" alone reads as free to share.
ANONYMOUS_FAMILY_NAME = "SYNTHETIC"
NOT_ANONYMOUS_FAMILY_NAME = "NOT-ANONYMOUS"
PATIENT_SCAN_FAMILY_NAME = "PATIENT-SCAN"


def patient_name_family(provenance: Mapping[str, Any]) -> str:
    """The family name of the exported patient (the given name is the case id), from sanitised provenance."""
    if patient_scan(provenance):
        return PATIENT_SCAN_FAMILY_NAME
    return ANONYMOUS_FAMILY_NAME if exported_privacy(provenance).anonymous()[0] else NOT_ANONYMOUS_FAMILY_NAME


@dataclass(frozen=True)
class TumourSource:
    """What the DICOM Segmentation says of its tumour labels.

    Attributes:
        drawn: MedSynth drew them (a parametric tumour, or no tumour): the only case called synthetic.
        segment: follows each segment's name in its Segment Description.
        short: follows "Tumour labels, " in the content and series descriptions (64 characters at most in all).
    """

    drawn: bool
    segment: str
    short: str


#: The steps that bring a tumour of each origin into the label map; a step after the last of them edited it.
_TUMOUR_STEPS = {"patient": "derive_labels", "inserted": "insert_tumour", "segmentation": "tumour_from_segmentation"}


def tumour_source(provenance: Mapping[str, Any]) -> TumourSource:
    """Where the tumour labels came from, by the privacy record's tumour origin and the edits after it."""
    origin = exported_privacy(provenance).tumour_origin
    if origin in ("parametric", "none"):
        return TumourSource(True, "synthetic: drawn by MedSynth", "synthetic")
    names = [step.get("name") for step in provenance.get("edits", []) if isinstance(step, Mapping)]
    brought = [index for index, name in enumerate(names) if name == _TUMOUR_STEPS.get(origin)]
    edited = ", edited by MedSynth" if brought and brought[-1] < len(names) - 1 else ""
    if origin == "patient":
        return TumourSource(False, f"from the patient's own segmentation{edited}", f"the patient's own{edited}")
    if origin == "inserted":
        placed = "placed and edited by MedSynth" if edited else "placed by MedSynth"
        return TumourSource(False, f"another label map's tumour, which may be a patient's segmentation, {placed}",
                            f"another map's, {placed}")
    if origin == "segmentation":
        return TumourSource(False, f"from a segmentation loaded or drawn in Slicer, which may be a patient's{edited}",
                            f"loaded or drawn in Slicer{edited}")
    if origin == "mixed":
        return TumourSource(False, "of mixed origin: drawn by MedSynth together with, or in place of, a tumour it did "
                                   "not draw, which may be a patient's", "mixed origin, may be a patient's")
    return TumourSource(False, "origin not recorded: may be a patient's segmentation",
                        "origin not recorded, may be a patient's")



def segment_algorithm(source: TumourSource) -> tuple[str, Any]:
    """Segment Algorithm Type (0062,0008) and algorithm family (CID 7162) of the tumour segments.

    MedSynth's network paints the images from the labels; it never computes the labels, so no segment is
    "Artificial Intelligence".  A tumour MedSynth drew is AUTOMATIC, shaped by morphological operations (a noisy
    ellipsoid, its enhancing rim and oedema grown by distance: :mod:`MedSynthLib.edits.parametric`).  Any other
    tumour is a segmentation someone made (a patient's expert segmentation, another map's, a Slicer segment) that
    MedSynth at most moved or placed: SEMIAUTOMATIC (made with a person, not by MedSynth alone), manual processing.
    """
    from pydicom.sr.codedict import codes

    if source.drawn:
        return "AUTOMATIC", codes.DCM.MorphologicalOperations
    return "SEMIAUTOMATIC", codes.DCM.ManualProcessing


# --- DICOM -------------------------------------------------------------------------------------


def _ds(value: float) -> Any:
    from pydicom.valuerep import DSfloat

    return DSfloat(float(value), auto_format=True)


def segment_colour(rgb: tuple[float, float, float]) -> Any:
    """A label colour (sRGB in [0, 1]) as highdicom's CIE L*a*b* colour (D65)."""
    import highdicom as hd

    return hd.color.CIELabColor.from_rgb(*(255.0 * float(c) for c in rgb))


@dataclass
class _DicomContext:
    case_id: str
    exported_at: datetime
    study_uid: str
    frame_of_reference_uid: str
    provenance: dict[str, Any]

    @property
    def patient_scan(self) -> bool:
        """The images are a real patient's scan with one region re-rendered (inpainting), not synthetic."""
        return patient_scan(self.provenance)

    @property
    def privacy(self) -> Any:
        return exported_privacy(self.provenance)

    @property
    def anonymous(self) -> bool:
        """The case passes ``export --anonymous`` (a patient's scan never does)."""
        return not self.patient_scan and self.privacy.anonymous()[0]

    @property
    def deidentification_method(self) -> str:
        if self.patient_scan:
            return PATIENT_SCAN_DEIDENTIFICATION_METHOD
        if self.anonymous:
            return DEIDENTIFICATION_METHOD
        return (PATIENT_ANATOMY_DEIDENTIFICATION_METHOD if self.privacy.anatomy == "patient"
                else NOT_ANONYMOUS_DEIDENTIFICATION_METHOD)

    @property
    def identity_removed(self) -> str:
        """Patient Identity Removed: 'the true identity ... removed from the Attributes and the Pixel Data' holds only
        for an anonymous case; a patient's scan, anatomy or tumour shape in the pixels can identify the patient (the
        attributes carry no identifier either way; De-identification Method, allowed with NO, says so)."""
        return "YES" if self.anonymous else "NO"

    @property
    def study_description(self) -> str:
        if self.patient_scan:
            return "MedSynth: patient brain MRI, tumour region re-rendered"
        if self.anonymous:
            return "MedSynth synthetic brain tumour MRI"
        return ("MedSynth synthetic MRI of a patient's anatomy: NOT anonymous" if self.privacy.anatomy == "patient"
                else "MedSynth synthetic brain tumour MRI: NOT anonymous")

    @property
    def date(self) -> str:
        return self.exported_at.strftime("%Y%m%d")

    @property
    def time(self) -> str:
        return self.exported_at.strftime("%H%M%S")


def _contributing_equipment(ctx: _DicomContext) -> Any:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    model = ctx.provenance["model"]
    return hd.ContributingEquipment(
        manufacturer="MedSynth",
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=f"MedSynth model {model['name']}"[:64],
        software_versions=_software_versions(ctx),
        contribution_datetime=ctx.exported_at.replace(tzinfo=None),
        contribution_description=provenance_summary(ctx.provenance, limit=1024, with_params=False),
    )


def _software_versions(ctx: _DicomContext) -> list[str]:
    sha = ctx.provenance["model"].get("sha256") or "unknown"
    return [f"MedSynth {__version__}", f"model sha256 {sha[:48]}"]


def _common_dataset(ctx: _DicomContext) -> Any:
    """Patient, study, frame of reference, equipment and synthetic/de-identification attributes."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence

    ds = Dataset()
    # The family name says what the case is (anonymous synthetic, not anonymous, a patient's scan), the given
    # name is the case id.
    ds.PatientName = f"{patient_name_family(ctx.provenance)}^{ctx.case_id}"
    ds.PatientID = ctx.case_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.PatientIdentityRemoved = ctx.identity_removed
    ds.DeidentificationMethod = ctx.deidentification_method
    ds.SyntheticData = "YES"
    ds.StudyInstanceUID = ctx.study_uid
    ds.StudyDate = ctx.date
    ds.StudyTime = ctx.time
    ds.StudyID = ""
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = ctx.study_description
    ds.FrameOfReferenceUID = ctx.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "MedSynth"
    ds.ManufacturerModelName = "MedSynth synthetic MRI"
    ds.SoftwareVersions = _software_versions(ctx)
    ds.BodyPartExamined = "BRAIN"
    ds.TimezoneOffsetFromUTC = "+0000"
    ds.InstanceCreationDate = ctx.date
    ds.InstanceCreationTime = ctx.time
    ds.ContributingEquipmentSequence = DicomSequence([_contributing_equipment(ctx)])
    return ds


def _mr_series(modality: str, values: np.ndarray, grid: Grid, ctx: _DicomContext,
               synthetic_mask: np.ndarray | None = None) -> list[Any]:
    """One MR Image Storage dataset per slice (third grid axis) of one modality.

    With ``synthetic_mask`` (a patient's scan with a region re-rendered) only the slices that hold a re-rendered
    voxel say Synthetic Data = YES; the others are the patient's acquired images.
    """
    import highdicom as hd
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    encoding = encode_intensities(values, exact=ctx.patient_scan)  # the patient's values are never rounded
    folder_name, description, number = DICOM_SERIES[modality]
    series_uid = hd.UID()
    direction = grid.direction_matrix
    row_dir, col_dir = direction[:, 0], direction[:, 1]  # along i (a row), along j (a column)
    normal = np.cross(row_dir, col_dir)
    brain = values[values != 0]
    low, high = np.percentile(brain, [0.5, 99.5]) if brain.size else (0.0, 1.0)
    common = _common_dataset(ctx)
    common.SOPClassUID = MR_IMAGE_STORAGE
    common.Modality = "MR"
    common.SeriesInstanceUID = series_uid
    common.SeriesNumber = number
    common.SeriesDate = ctx.date
    common.SeriesTime = ctx.time
    common.SeriesDescription = (f"{description} patient scan, region synthetic (MedSynth)" if ctx.patient_scan
                                else f"{description} synthetic (MedSynth)")
    common.PatientPosition = ""
    common.ImageType = ["DERIVED", "SECONDARY"]
    common.ContentDate = ctx.date
    common.ContentTime = ctx.time
    common.ImageComments = provenance_summary(ctx.provenance)
    common.BurnedInAnnotation = "NO"
    common.ScanningSequence = "RM"  # research mode: no pulse sequence made these images
    common.SequenceVariant = "NONE"
    common.ScanOptions = ""
    common.MRAcquisitionType = "3D"
    common.RepetitionTime = ""
    common.EchoTime = ""
    common.EchoTrainLength = ""
    common.ImageOrientationPatient = [_ds(v) for v in (*row_dir, *col_dir)]
    common.PixelSpacing = [_ds(grid.spacing[1]), _ds(grid.spacing[0])]  # [between rows, between columns]
    common.SliceThickness = _ds(grid.spacing[2])
    common.SpacingBetweenSlices = _ds(grid.spacing[2])
    common.SamplesPerPixel = 1
    common.PhotometricInterpretation = "MONOCHROME2"
    common.Rows = grid.size[1]
    common.Columns = grid.size[0]
    common.BitsAllocated = 16
    common.BitsStored = 16
    common.HighBit = 15
    common.PixelRepresentation = 1
    common.RescaleIntercept = _ds(0)
    common.RescaleSlope = _ds(encoding.slope)
    common.RescaleType = "US"
    common.WindowCenter = _ds((low + high) / 2)
    common.WindowWidth = _ds(max(high - low, 1e-3))
    datasets = []
    for k in range(grid.size[2]):
        ds = copy.deepcopy(common)
        position = grid.index_to_lps(np.array([0.0, 0.0, float(k)]))
        ds.SOPInstanceUID = hd.UID()
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.SliceLocation = _ds(float(position @ normal))
        if synthetic_mask is not None:
            ds.SyntheticData = "YES" if synthetic_mask[k].any() else "NO"
        ds.PixelData = np.ascontiguousarray(encoding.stored[k], dtype="<i2").tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        datasets.append(ds)
    return datasets


def _segmentation(case: Any, t1: list[Any], ctx: _DicomContext) -> Any:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from ..schema.labels import LABEL_INFO

    source = tumour_source(ctx.provenance)
    algorithm_type, family = segment_algorithm(source)
    algorithm = hd.AlgorithmIdentificationSequence(name="MedSynth", family=family, version=__version__)
    descriptions = []
    for number, label, short, name in SEG_SEGMENTS:
        kind = {Label.NCR: codes.SCT.Necrosis, Label.ED: codes.SCT.Edema, Label.ET: codes.SCT.Neoplasm}[label]
        description = hd.seg.SegmentDescription(
            segment_number=number, segment_label=short,
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=kind, algorithm_type=algorithm_type,
            algorithm_identification=algorithm,
            tracking_uid=hd.UID(), tracking_id=f"{ctx.case_id} {short}",
            anatomic_regions=[codes.SCT.Brain],
            display_color=segment_colour(LABEL_INFO[label].color))
        description.SegmentDescription = f"{name} ({source.segment})"
        descriptions.append(description)
    lut = np.zeros(len(Label), np.uint8)
    for number, label, _, _ in SEG_SEGMENTS:
        lut[label] = number
    pixels = lut[case.labels.array]
    seg = hd.seg.Segmentation(
        source_images=t1, pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="MedSynth",
        manufacturer_model_name="MedSynth synthetic MRI", software_versions=_software_versions(ctx),
        device_serial_number="0",
        content_description=("Synthetic tumour labels (NCR, ED, ET)" if source.drawn
                             else f"Tumour labels, {source.short}"),
        content_creator_name="MedSynth^", content_label="TUMOUR",
        omit_empty_frames=bool(pixels.any()),
        contributing_equipment=[_contributing_equipment(ctx)],
    )
    seg.SeriesDescription = ("Tumour segmentation synthetic (MedSynth)" if source.drawn
                             else f"Tumour labels, {source.short}")
    seg.PatientIdentityRemoved = ctx.identity_removed
    seg.DeidentificationMethod = ctx.deidentification_method
    seg.SyntheticData = "YES"
    seg.TimezoneOffsetFromUTC = "+0000"
    seg.SeriesDate = ctx.date
    seg.SeriesTime = ctx.time
    seg.ContentDate = ctx.date
    seg.ContentTime = ctx.time
    seg.InstanceCreationDate = ctx.date
    seg.InstanceCreationTime = ctx.time
    seg.BodyPartExamined = "BRAIN"
    return seg


def write_dicom_case(case: Any, folder: Path, case_id: str, exported_at: datetime,
                     provenance: dict[str, Any]) -> list[str]:
    """Write the MR series and the Segmentation of one case into ``folder``; returns relative paths."""
    import highdicom as hd

    ctx = _DicomContext(case_id, exported_at, hd.UID(), hd.UID(), provenance)
    written = []
    t1: list[Any] = []
    for modality in MODALITIES:
        datasets = _mr_series(modality, case.images[modality], case.grid, ctx, getattr(case, "synthetic_mask", None))
        series_dir = folder / DICOM_SERIES[modality][0]
        series_dir.mkdir()
        width = max(4, len(str(len(datasets))))
        for index, ds in enumerate(datasets, start=1):
            name = f"IM{index:0{width}d}.dcm"
            ds.save_as(series_dir / name, enforce_file_format=True)
            written.append(f"{series_dir.name}/{name}")
        if modality == "t1":
            t1 = datasets
    seg = _segmentation(case, t1, ctx)
    (folder / "SEG").mkdir()
    seg.save_as(folder / "SEG" / "seg.dcm", enforce_file_format=True)
    written.append("SEG/seg.dcm")
    return written

