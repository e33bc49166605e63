"""Continuous training: drift alerts → federated runs → candidates → canary rollouts (docs/drift.md).

`service` holds the policies, the turns of the loop and `step`, which the coordinator's CT thread runs.
"""

__all__: list[str] = []
