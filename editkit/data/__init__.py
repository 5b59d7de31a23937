"""Dataset records, manifest formats, image policy, buckets, mixing and the synthetic dataset."""
