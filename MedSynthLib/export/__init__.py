"""Export of synthetic cases as BraTS NIfTI or DICOM, marked synthetic (``dicom``, to be split by concern).
"""
