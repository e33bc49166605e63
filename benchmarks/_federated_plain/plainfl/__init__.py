"""A plain Flower App: the baseline the benchmark compares edgefleet's Flower App against."""
