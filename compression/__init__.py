"""edgefleet compression package."""
