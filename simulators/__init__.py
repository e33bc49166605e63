"""edgefleet simulators package."""
