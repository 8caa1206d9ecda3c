"""``medsynth generate``: a ready-to-train synthetic dataset in one command.

``sampler`` validates the sampler config and draws case i's label map from (seed, i);
``sources`` finds and caches the label maps it draws from (real cases, tumour-only label
maps, the template); ``layouts`` writes nnU-Net v2, MSD and BraTS folders; ``runner`` shards
the case indices over processes, GPUs and torchrun ranks and resumes after a kill;
``card`` writes the dataset card.
"""
