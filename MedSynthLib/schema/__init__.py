"""The label-map schema every other subpackage builds on.

Label values and tables (``labels``), voxel grids and ``LabelMap`` (``grid``), label-map files
with their provenance sidecar (``labelmap``), provenance records (``provenance``), image and
JSON file I/O with atomic writes (``volume_io``) and the error types (``errors``).
"""
