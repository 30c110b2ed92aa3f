"""What can be exported and how it loads: model families, the zoo, checkpoints,
downloads, UNICOM, the RoPE tracing patch, FLOPs, tiny test checkpoints.
"""
