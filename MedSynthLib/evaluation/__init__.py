"""Evaluation: fidelity metrics (``metrics``) and the held-out evaluation of a model (``evaluate``).
"""
