"""edgefleet federated package."""
