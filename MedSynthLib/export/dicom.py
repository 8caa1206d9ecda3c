"""DICOM export of a synthetic case: four MR Image Storage series and a DICOM Segmentation.

``T1/ T1ce/ T2/ FLAIR/`` - one MR Image Storage series each (``IM0001.dcm`` ...,
one file per slice along the grid's third axis), all in one study and one frame of
reference; ``SEG/seg.dcm`` - the tumour labels as a DICOM Segmentation (highdicom,
BINARY, segments 1 NCR, 2 ED, 3 ET) referencing the T1 series.

Every export gets fresh UIDs.  Each file has Synthetic Data (0008,001C) YES, a
De-identification Method that says whether the case is anonymous (Patient Identity Removed
YES only then: otherwise the pixels carry a patient's anatomy, tumour shape or scan),
a generated patient name and ID (the case id), and the sanitised provenance summarised
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

#: Tumour segments of the DICOM Segmentation: number, MedSynth label, label, description.
SEG_SEGMENTS: tuple[tuple[int, Label, str, str], ...] = (
    (1, Label.NCR, "NCR", "Necrotic / non-enhancing tumour core (synthetic)"),
    (2, Label.ED, "ED", "Peritumoural oedema (synthetic)"),
    (3, Label.ET, "ET", "Enhancing tumour (synthetic)"),
)



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
    # The family name says what the images are, the given name is the case id.
    ds.PatientName = f"{'PATIENT-SCAN' if ctx.patient_scan else 'SYNTHETIC'}^{ctx.case_id}"
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

    algorithm = hd.AlgorithmIdentificationSequence(name="MedSynth", family=codes.DCM.ArtificialIntelligence,
                                                   version=__version__)
    from ..schema.labels import LABEL_INFO

    descriptions = []
    for number, label, short, text in SEG_SEGMENTS:
        kind = {Label.NCR: codes.SCT.Necrosis, Label.ED: codes.SCT.Edema, Label.ET: codes.SCT.Neoplasm}[label]
        description = hd.seg.SegmentDescription(
            segment_number=number, segment_label=short,
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=kind, algorithm_type="AUTOMATIC", algorithm_identification=algorithm,
            tracking_uid=hd.UID(), tracking_id=f"{ctx.case_id} {short}",
            anatomic_regions=[codes.SCT.Brain],
            display_color=segment_colour(LABEL_INFO[label].color))
        description.SegmentDescription = text
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
        device_serial_number="0", content_description="Synthetic tumour labels (NCR, ED, ET)",
        content_creator_name="MedSynth^", content_label="TUMOUR",
        omit_empty_frames=bool(pixels.any()),
        contributing_equipment=[_contributing_equipment(ctx)],
    )
    seg.SeriesDescription = "Tumour segmentation synthetic (MedSynth)"
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

