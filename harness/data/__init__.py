"""Data layer: datasets and their split manifests, and the batched (on-device) and per-image augmentations."""
