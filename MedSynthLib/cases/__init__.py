"""Reading cases: image folders and their tumour segmentations (``readers``), the derived
healthy anatomy (``anatomy``) and the ICBM152 template canvas (``template``).
"""
