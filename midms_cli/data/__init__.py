"""Dataset plugins, exemplar pairing and WebDataset shards."""
