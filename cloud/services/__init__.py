"""The coordinator's logic, called by the API and the MQTT bridge; keyword-only functions, domain errors.

One module per concern, imported by its path (this package imports none of them, so that importing one
never drags in the others): `registry` (models, versions, artifacts), `variants` (a version's further
artifacts), `deployments` (desired states), `devices` (reported state and events), `enrolment` (which
devices belong to the fleet: tokens, certificates, revocation), `tokens` (API tokens), `cards` (model cards,
their digest, who may change them), `approvals` (which versions may be deployed, what high-risk ones lack),
`aliases` (movable names of versions, resolved when a deployment or rollout is created), `removal` (deleting a
version nothing holds, and its unshared artifacts), `decommission` (retiring a device for good).
Rollouts live in `cloud.rollouts`, telemetry in `cloud.telemetry`.
"""

__all__: list[str] = []
