"""edgefleet federated retraining (docs/federated.md).

- `flowerapp/`: the Flower App the coordinator runs for each federated run (a template directory; it runs in the
  Flower venv and imports no edgefleet package).
- `candidate`: `python -m federated.candidate RUN_ID`, which turns a completed run into a registered candidate
  version; `build` (compression of the candidate) and `lineage` (its name, variants, card and canary plan; pure).

Nothing is imported here: the submodules pull in torch, the compression package or the API client.
"""

__all__: list[str] = []
