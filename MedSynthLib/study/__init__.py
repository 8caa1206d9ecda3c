"""``medsynth study``: the cross-validated augmentation study (``run``), its prepared cases
(``data``), the tumour segmenter (``segmenter``) and the report (``report``).
"""
