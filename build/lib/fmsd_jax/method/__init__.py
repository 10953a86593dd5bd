"""FMSD method: layer masking, SVD decomposition, losses, masked optimizer."""
