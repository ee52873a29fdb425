"""Everything a hospital runs locally: slide reading, tissue, tiling, encoding, training."""
