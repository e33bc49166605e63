"""Helpers of the drift tests: a real model run over (drifted) held-out digits, sketched into telemetry windows the
way an agent's recorder does, and stored through the coordinator's ingest path."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort
from sqlmodel import Session

from cloud.coordinator import Coordinator
from cloud.telemetry.windows import ingest_telemetry
from compression.data import load_dataset
from compression.profile import build_profile
from protocol.messages import ModelRef, TelemetryWindow, utcnow
from protocol.outputs import OutputSemantics, predictions
from protocol.profiles import ReferenceProfile
from protocol.sketches import SketchSet
from protocol.telemetry import latency_histogram
from simulators.drift import parse_drift
from tests.cloud.fleet_helpers import enrol

if TYPE_CHECKING:
    from tests.cloud.conftest import Api


@dataclass
class DigitsDevice:
    """A device serving the digits classifier: sends windows of what it sketched, seq by seq."""

    device_id: str
    session: ort.InferenceSession
    semantics: OutputSemantics
    seq: int = 0
    right: int = 0
    seen: int = 0

    def window(self, rows: np.ndarray, labels: np.ndarray, *, model: ModelRef, batch: int = 8) -> TelemetryWindow:
        """Serve `rows` in batches and return the window an agent would send for them."""
        sketches, classes = SketchSet(), dict[str, int]()
        name, outputs = self.session.get_inputs()[0].name, [o.name for o in self.session.get_outputs()]
        for start in range(0, len(rows), batch):
            chunk = np.ascontiguousarray(rows[start : start + batch], dtype=np.float32)
            read = predictions(self.semantics, dict(zip(outputs, self.session.run(None, {name: chunk}), strict=True)))
            sketches.update(chunk, read)
            assert read.classes is not None
            for cls in read.classes:
                classes[str(int(cls))] = classes.get(str(int(cls)), 0) + 1
            self.right += int((read.classes == labels[start : start + batch]).sum())
        self.seen += len(rows)
        self.seq += 1
        end = utcnow()
        return TelemetryWindow(
            device_id=self.device_id, seq=self.seq, prev_seq=self.seq - 1 if self.seq > 1 else None,
            window_start=end - timedelta(seconds=10), window_end=end, model=model, inference_count=len(rows),
            error_count=0, latency_histogram=latency_histogram([1.0] * len(rows)), class_counts=classes,
            sketches=sketches.to_wire(),
        )  # fmt: skip

    @property
    def accuracy(self) -> float:
        """The share of right predictions so far (what labels would say)."""
        return self.right / max(1, self.seen)


def digits_profile(model_path: Path) -> ReferenceProfile:
    """The reference profile of the digits classifier over the held-out digits."""
    return build_profile(model_path, load_dataset("digits"), source="digits (held-out)")


def send_traffic(
    coordinator: Coordinator,
    devices: list[DigitsDevice],
    *,
    model: ModelRef,
    drift: dict[str, str],
    windows: int = 3,
    rows: int = 120,
    seed: int = 0,
) -> None:
    """Each device serves `windows` windows of random held-out digits (drifted by `drift[device_id]`, if any)."""
    data, rng = load_dataset("digits"), np.random.default_rng(seed)
    assert data.y is not None
    for device in devices:
        spec = drift.get(device.device_id)
        for _ in range(windows):
            picked = rng.choice(len(data.x), rows)
            x = data.x[picked].astype(np.float32)
            if spec is not None:
                x = parse_drift(spec).apply(x, rng).astype(np.float32)
            window = device.window(x, data.y[picked], model=model)
            with Session(coordinator.engine) as session:
                assert ingest_telemetry(session=session, window=window)


def profiled_fleet(
    api: Api, model_path: Path, sites: dict[str, str]
) -> tuple[list[DigitsDevice], ModelRef, ReferenceProfile, dict[str, Any]]:
    """digits:1.0 pushed with its reference profile, and one enrolled device per `sites` entry (device id → its
    `site` tag): the devices, the model they serve, the profile and the push's answer."""
    profile = digits_profile(model_path)
    pushed = api.push("digits", "1.0", model_path.read_bytes(), profile=profile.model_dump_json())
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    devices = []
    for device_id, site in sites.items():
        enrol(api.coordinator, device_id, tags={"site": site})
        devices.append(DigitsDevice(device_id, session, profile.semantics))
    return devices, ModelRef(name="digits", version="1.0", sha256=str(pushed["sha256"])), profile, pushed
