"""Synthesis: model folders (``models``), the networks and their inference U-Net, intensity
normalisation, the synthesis engine and its output folder (``synthesize``), preview montages
(``render``) and process settings of MedSynth's own processes (``runtime``).
"""
