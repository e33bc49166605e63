"""Signed-artifact governance on the coordinator: keys, the TUF image repository, the director (docs/governance.md).

`keys` (offline root, online and approver keys), `root` (root metadata and its policy), `repository` (the image
repository in the database), `director` (per-device instructions), `service` (what the coordinator signs when).
The verification side every device runs is `protocol.governance`.
"""

__all__: list[str] = []
