"""edgefleet agent package."""
