"""Triton Inference Server model repository generation (encoder, preprocessing, ensemble) and serving."""
