"""MedSynthLib: the MedSynth backend for synthesising brain-tumour MRI from label maps.

Never imports Slicer or Qt; the ``medsynth`` command line and the 3D Slicer
module are thin layers over this package.
"""

__version__ = "0.1.0"
