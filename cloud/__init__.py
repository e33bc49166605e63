"""edgefleet cloud package."""
