"""Training the generator: the GAN training loop (``train``) and its prepared cases and patch
sampling (``data``).
"""
