"""Export of synthetic cases as BraTS NIfTI or DICOM, marked synthetic.

``package`` (read, verify, check anonymity, write atomically), ``sanitise`` (what may
leave), ``encoding`` (int16 / float32 storage), ``nifti`` and ``dicom`` (the layouts).
"""

from .dicom import DEIDENTIFICATION_METHOD
from .encoding import encode_intensities
from .nifti import NAMINGS
from .package import FORMATS, MODALITIES, SyntheticCase, export_case, export_cases, read_synthetic_case
from .sanitise import provenance_summary, sanitise_provenance

__all__ = ["DEIDENTIFICATION_METHOD", "FORMATS", "MODALITIES", "NAMINGS", "SyntheticCase", "encode_intensities",
           "export_case", "export_cases", "provenance_summary", "read_synthetic_case", "sanitise_provenance"]
