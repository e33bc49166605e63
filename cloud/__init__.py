"""The edgefleet coordinator: registry, artifact store, deployments, MQTT bridge, embedded broker and CLI.

`create_app(settings)` lives in `cloud.app` and `EmbeddedBroker` in `cloud.broker`; importing this
package starts nothing.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
