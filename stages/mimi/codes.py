"""What one frame of Mimi codes is: up to TOTAL_CODEBOOKS codes, one per codebook, each an index
0..CODEBOOK_BINS - 1. Kept free of torch so that stage params, the pipeline's checks and the Moshi LM's
config read them without loading a model.
"""

TOTAL_CODEBOOKS = 32  # 1 semantic codebook + 31 acoustic ones; Moshi reads the first 8
CODEBOOK_BINS = 2048  # entries per codebook: a code is 0..2047
