"""Drift monitoring: devices' merged window sketches per cohort against a version's reference profile.

`stats` (pure: KS, PSI, Wasserstein per feature; class and confidence shift; estimated accuracy from the
profile's calibration), `service` (the windows of a sliding range merged per cohort), `report` (the HTML page).
"""

__all__: list[str] = []
