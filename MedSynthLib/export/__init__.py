"""Export of synthetic cases as BraTS NIfTI or DICOM, marked synthetic (``writer``).
"""
