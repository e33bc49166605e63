"""Federated learning on the coordinator side: the Flower SuperLink it runs, the `flwr` control, node identities.

- `flower.py`     `FlowerControl`: the `flwr` CLI of the Flower venv (register nodes, start and watch runs)
- `superlink.py`  the supervised `flower-superlink` and `start_federation` (what `Settings.federated` adds)
- `nodes.py`      every enrolled device's key registered with the SuperLink, revoked ones unregistered
"""

from cloud.federation.flower import FlowerControl, FlowerError, FlowerRunStatus, flower_bin_dir
from cloud.federation.nodes import eligible_node_ids
from cloud.federation.superlink import Federation, SuperLinkStartError, check_superlink_port, start_federation

__all__ = [
    "Federation",
    "FlowerControl",
    "FlowerError",
    "FlowerRunStatus",
    "SuperLinkStartError",
    "check_superlink_port",
    "eligible_node_ids",
    "flower_bin_dir",
    "start_federation",
]
