"""MedSynth in a web browser: review synthetic cases beside real ones, and run blinded reader studies.

A separate package from MedSynthLib because it renders with Slicer's MRML libraries (through
trame-slicer), which the backend never imports.  Installed with the ``web`` extra:
``pip install 'medsynth[web]'``; started by ``medsynth review`` (see :mod:`MedSynthWeb.cli`).
"""
