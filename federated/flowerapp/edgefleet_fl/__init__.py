"""edgefleet's Flower App for federated retraining (runs in the Flower venv; imports no edgefleet package).

`server_app.app` and `client_app.app` are the components pyproject.toml names; see docs/federated.md.
"""
