"""Encoders the harness gives to methods (small CNN, ResNets, ViT), registered by name."""
