"""Which devices may join the SuperLink: every enrolled device's key registered, every other one unregistered.

A device's SuperNode authenticates with its enrolment key in OpenSSH form; the coordinator derives the public key
from the device's current certificate (`FleetPki.issued_certificate`) and registers it with the SuperLink
(`flwr supernode register`, name = device id), keeping the node id in `flower_node`. A reconciler thread brings
the SuperLink in line with the fleet every few seconds, and at once when nudged (after an enrolment or a
revocation, and when the SuperLink (re)starts):

- an enrolled device with a current certificate and no live node  → register its key
- a live node whose device is no longer enrolled (revoked, decommissioned, pending a new token) → unregister it
- a live node whose key is not the current certificate's (renewal with a new key) → unregister it, register the new
- a live node the SuperLink no longer knows (its database was lost) → register the key again

`plan_nodes` decides (pure); `NodeReconciler` does the IO, one device at a time: a failure is logged with the
device id and tried again next tick, and never stops the others or the coordinator. Each registration and
unregistration is recorded in the audit log. Unregistering is one-way in Flower (a key is never accepted again),
so an unregistered row stays as the record of why that key is refused; a device enrolled again brings a new key.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, col, select

from cloud import audit
from cloud.errors import CloudError
from cloud.federation.flower import CODE_KEY_IN_USE, CODE_NODE_NOT_FOUND, FlowerControl, FlowerError
from cloud.models import Device, DeviceCertificate, EnrolmentState, FlowerNode, as_utc
from cloud.pki import FleetPki
from protocol.messages import utcnow

__all__ = [
    "ACTOR",
    "NodeAction",
    "NodeReconciler",
    "NodeRow",
    "eligible_node_ids",
    "openssh_public_key",
    "plan_nodes",
    "superlink_node_lookup",
]

log = logging.getLogger(__name__)

ACTOR = "coordinator"  # the audit log's actor of what the reconciler does
_LIST_EVERY_S = 600.0  # how often the SuperLink's node list is compared even without a restart
_MAX_RETRY_S = 300.0  # a step that keeps failing is retried at most this far apart (each try runs a flwr process)
_UINT64 = (1 << 64) - 1


# -- the decision (pure) ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeRow:
    """What the plan reads of a `flower_node` row."""

    node_id: str
    public_key: str
    live: bool  # not unregistered


@dataclass(frozen=True)
class NodeAction:
    """One step: `register` the device's key, `unregister` its node, or `replace` (unregister, then register)."""

    kind: str
    device_id: str
    node_id: str = ""
    public_key: str = ""
    reason: str = ""


def plan_nodes(
    keys: Mapping[str, str | None],
    rows: Mapping[str, NodeRow],
    flower: Mapping[str, str] | None = None,
) -> list[NodeAction]:
    """The steps that bring the SuperLink in line with the fleet. Pure.

    `keys`: every enrolled device → the OpenSSH public key of its current certificate (None: none known);
    `rows`: device → its `flower_node` row; `flower`: node id → status as the SuperLink lists them (None: not
    asked this time).
    """
    actions: list[NodeAction] = []
    for device_id, row in sorted(rows.items()):
        if row.live and device_id not in keys:
            actions.append(NodeAction("unregister", device_id, row.node_id, reason="device no longer enrolled"))
    for device_id, key in sorted(keys.items()):
        known = rows.get(device_id)
        if key is None:
            continue
        if known is None:
            actions.append(NodeAction("register", device_id, public_key=key, reason="enrolled"))
        elif not known.live:
            if known.public_key != key:
                actions.append(NodeAction("register", device_id, public_key=key, reason="enrolled again"))
        elif known.public_key != key:
            actions.append(NodeAction("replace", device_id, known.node_id, key, reason="certificate with a new key"))
        elif flower is not None and known.node_id not in flower:
            actions.append(NodeAction("register", device_id, public_key=key, reason="unknown to the SuperLink"))
        elif flower is not None and flower[known.node_id] == "unregistered":
            actions.append(NodeAction("forget", device_id, known.node_id, reason="unregistered on the SuperLink"))
    return actions


def openssh_public_key(public_key: ec.EllipticCurvePublicKey) -> str:
    """A device key as Flower reads it: `ecdsa-sha2-nistp256 AAAA...`."""
    return public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


# -- reading the fleet ------------------------------------------------------------------------------------------


def eligible_node_ids(session: Session, device_ids: Iterable[str]) -> dict[str, str]:
    """Device → SuperNode id of those of `device_ids` that are enrolled and hold a live registration."""
    wanted = list(dict.fromkeys(device_ids))
    if not wanted:
        return {}
    statement = (
        select(FlowerNode.device_id, FlowerNode.node_id)
        .join(Device, col(Device.id) == col(FlowerNode.device_id))
        .where(
            col(FlowerNode.device_id).in_(wanted),
            col(FlowerNode.unregistered_at).is_(None),
            col(Device.enrolment) == EnrolmentState.ENROLLED.value,
        )
    )
    return {device_id: node_id for device_id, node_id in session.exec(statement)}


def _current_certificates(session: Session, now: datetime) -> dict[str, DeviceCertificate]:
    """Enrolled device → its newest certificate that is neither revoked nor expired (devices without: absent)."""
    statement = (
        select(DeviceCertificate)
        .join(Device, col(Device.id) == col(DeviceCertificate.device_id))
        .where(col(Device.enrolment) == EnrolmentState.ENROLLED.value, col(DeviceCertificate.revoked_at).is_(None))
        .order_by(col(DeviceCertificate.issued_at), col(DeviceCertificate.id))
    )
    current: dict[str, DeviceCertificate] = {}
    for cert in session.exec(statement):
        not_after = as_utc(cert.not_after)
        if not_after is None or not_after > now:
            current[cert.device_id] = cert  # ordered oldest first: the newest wins
    return current


def _enrolled(session: Session) -> list[str]:
    return list(session.exec(select(Device.id).where(col(Device.enrolment) == EnrolmentState.ENROLLED.value)))


def superlink_node_lookup(database: Path) -> Callable[[str], str | None]:
    """A lookup of the node id an embedded SuperLink holds for an OpenSSH public key, read from its database.

    Only for the one case the CLI cannot answer: a key registered just before the coordinator died, so the
    coordinator never stored its node id (`flwr supernode register` then says "Public key already in use" and
    `flwr supernode list` shows no keys). Reads Flower 1.42's `node` table; None on any mismatch.
    """

    def lookup(public_key_openssh: str) -> str | None:
        try:
            wanted = _spki(serialization.load_ssh_public_key(public_key_openssh.encode()))
            with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5)) as db:
                rows = db.execute("SELECT node_id, status, public_key FROM node").fetchall()
        except (sqlite3.Error, ValueError, TypeError) as exc:
            log.warning("cannot look up a node in the SuperLink's database %s: %s", database, exc)
            return None
        for node_id, status, stored in rows:
            try:
                if status != "unregistered" and _spki(serialization.load_pem_public_key(bytes(stored))) == wanted:
                    return str(int(node_id) & _UINT64)  # Flower stores the uint64 id as a signed int64
            except (ValueError, TypeError):
                continue
        return None

    return lookup


def _keyless(device_id: str, cert: DeviceCertificate | None) -> str:
    """Why an enrolled device cannot be registered: no current certificate, or no copy of it kept."""
    if cert is None:
        return (
            f"device {device_id} has no current certificate (expired); it joins federated learning once it enrols again"
        )
    return (
        f"the coordinator kept no usable copy of device {device_id}'s certificate {cert.serial} (issued before it "
        "kept copies); the device joins federated learning after its next renewal"
    )


def _backoff(tick_s: float, failures: int) -> float:
    """The pause after `failures` failures in a row: the tick, doubling, at most `_MAX_RETRY_S`."""
    return min(_MAX_RETRY_S, tick_s * 2 ** min(failures - 1, 16))


def _spki(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# -- the reconciler (IO) ----------------------------------------------------------------------------------------


class NodeReconciler:
    """A thread that applies `plan_nodes` every `tick_s` seconds and whenever `nudge()` is called."""

    def __init__(
        self,
        *,
        engine: Engine,
        pki: FleetPki,
        control: FlowerControl,
        tick_s: float = 5.0,
        ready: Callable[[], bool] = lambda: True,
        generation: Callable[[], int] = lambda: 1,
        lookup: Callable[[str], str | None] = lambda _key: None,
    ) -> None:
        """`ready`: whether the SuperLink answers now; `generation`: raised at each (re)start of it, which makes
        the next reconciliation compare with its node list; `lookup`: `superlink_node_lookup` (embedded only)."""
        self.engine = engine
        self.pki = pki
        self.control = control
        self.tick_s = tick_s
        self._ready = ready
        self._generation = generation
        self._lookup = lookup
        self._listed_generation = -1
        self._listed_at = 0.0
        self._keys: dict[str, str | None] = {}  # certificate serial → OpenSSH key (None: no copy, or a mismatch)
        self._errors: dict[str, str] = {}  # device → the last error logged for it (each logged once while it lasts)
        self._retry: dict[str, tuple[NodeAction, float, int]] = {}  # device → (failed step, retry at, failures)
        self._paused_until = 0.0  # after a failed reconciliation: timed ticks wait (a nudge does not)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the thread (no-op when it runs); it reconciles at once."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._wake.set()
        self._thread = threading.Thread(target=self._run, name="flower-nodes", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread after its current step."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None

    def nudge(self) -> None:
        """Reconcile now rather than at the next tick."""
        self._wake.set()

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            nudged = self._wake.wait(self.tick_s)
            self._wake.clear()
            if self._stop.is_set():
                break
            if not self._ready() or (not nudged and time.monotonic() < self._paused_until):
                continue
            if self.run_guarded():
                failures = 0
            else:
                failures += 1
                self._paused_until = time.monotonic() + _backoff(self.tick_s, failures)

    def run_guarded(self) -> bool:
        """One reconciliation; an outage (database, SuperLink) or a bug is logged, never raised. False if it failed."""
        try:
            self.reconcile()
            return True
        except (SQLAlchemyError, CloudError, OSError) as exc:
            self._log_once("*", f"node reconciliation failed: {exc.__class__.__name__}: {exc}")
        except Exception:  # a bug must not end the thread: registrations would silently lapse
            log.exception("node reconciliation failed unexpectedly")
        return False

    def reconcile(self) -> list[NodeAction]:
        """Bring the SuperLink in line with the fleet once; the steps attempted."""
        with self._lock:
            flower = self._flower_nodes()
            with Session(self.engine) as session:
                now = utcnow()
                certificates = _current_certificates(session, now)
                keys = {device_id: self._key(certificates.get(device_id)) for device_id in _enrolled(session)}
                rows = {
                    r.device_id: NodeRow(r.node_id, r.public_key, r.unregistered_at is None)
                    for r in session.exec(select(FlowerNode))
                }
            for device_id in sorted(d for d, k in keys.items() if k is None and d not in rows):
                self._log_once(device_id, _keyless(device_id, certificates.get(device_id)), level=logging.WARNING)
            actions = plan_nodes(keys, rows, flower)
            now_s = time.monotonic()
            for action in actions:
                failed = self._retry.get(action.device_id)
                if failed is None or failed[0] != action or now_s >= failed[1]:
                    self._apply(action)
            self._errors.pop("*", None)
            return actions

    def _flower_nodes(self) -> dict[str, str] | None:
        """The SuperLink's node list (node id → status) after a (re)start of it or every few minutes, else None."""
        generation = self._generation()
        if generation == self._listed_generation and time.monotonic() - self._listed_at < _LIST_EVERY_S:
            return None
        nodes = {str(n.get("node-id")): str(n.get("status", "")) for n in self.control.nodes()}
        self._listed_generation, self._listed_at = generation, time.monotonic()
        return nodes

    def _key(self, cert: DeviceCertificate | None) -> str | None:
        """The OpenSSH public key of `cert`, from the CA's copy, checked against the key digest on record."""
        if cert is None:
            return None
        if cert.serial not in self._keys:
            key: str | None = None
            issued = self.pki.issued_certificate(cert.serial)
            if issued is not None:
                public_key = issued.public_key()
                digest = hashlib.sha256(_spki(public_key)).hexdigest()
                if isinstance(public_key, ec.EllipticCurvePublicKey) and digest == cert.public_key_sha256:
                    key = openssh_public_key(public_key)
                else:
                    log.error("the kept copy of certificate %s does not hold the key on record", cert.serial)
            self._keys[cert.serial] = key
        return self._keys[cert.serial]

    # -- the steps -------------------------------------------------------------------------------------------

    def _apply(self, action: NodeAction) -> None:
        """One step; a failure is logged (once while it repeats) and retried after a growing pause."""
        try:
            if action.kind in ("unregister", "replace", "forget"):
                self._unregister(action)
            if action.kind in ("register", "replace"):
                self._register(action)
        except (FlowerError, SQLAlchemyError) as exc:
            what = "record" if isinstance(exc, SQLAlchemyError) else action.kind
            self._log_once(action.device_id, f"cannot {what} the SuperNode of device {action.device_id}: {exc}")
            failed = self._retry.get(action.device_id)
            failures = failed[2] + 1 if failed is not None and failed[0] == action else 1
            self._retry[action.device_id] = (action, time.monotonic() + _backoff(self.tick_s, failures), failures)
        else:
            self._errors.pop(action.device_id, None)
            self._retry.pop(action.device_id, None)

    def _register(self, action: NodeAction) -> None:
        try:
            node_id = self.control.register_node(action.public_key, name=action.device_id)
        except FlowerError as exc:
            found = self._lookup(action.public_key) if exc.code == CODE_KEY_IN_USE else None
            if found is None:
                if exc.code == CODE_KEY_IN_USE:
                    raise FlowerError(
                        f"{exc}; this key was registered before (an unregistered key is refused for good: the device "
                        "must enrol again with a new key)",
                        code=exc.code,
                    ) from exc
                raise
            node_id = found  # registered before the coordinator could record it
        with Session(self.engine) as session:
            row = session.get(FlowerNode, action.device_id)
            if row is None:
                row = FlowerNode(device_id=action.device_id, node_id=node_id, public_key=action.public_key)
            row.node_id, row.public_key = node_id, action.public_key
            row.registered_at, row.unregistered_at = utcnow(), None
            session.add(row)
            details = {"node_id": node_id, "reason": action.reason}
            audit.record(
                session=session, actor=ACTOR, action="flower_node.registered", subject=action.device_id, details=details
            )
            session.commit()
        log.info("SuperNode registered device=%s node=%s reason=%s", action.device_id, node_id, action.reason)

    def _unregister(self, action: NodeAction) -> None:
        if action.kind != "forget":
            try:
                self.control.unregister_node(action.node_id)
            except FlowerError as exc:
                if exc.code != CODE_NODE_NOT_FOUND:  # not found: unregistered already
                    raise
        with Session(self.engine) as session:
            row = session.get(FlowerNode, action.device_id)
            if row is None or row.unregistered_at is not None:
                return
            row.unregistered_at = utcnow()
            session.add(row)
            details = {"node_id": action.node_id, "reason": action.reason}
            audit.record(
                session=session,
                actor=ACTOR,
                action="flower_node.unregistered",
                subject=action.device_id,
                details=details,
            )
            session.commit()
        log.warning(
            "SuperNode unregistered device=%s node=%s reason=%s", action.device_id, action.node_id, action.reason
        )

    def _log_once(self, key: str, message: str, *, level: int = logging.ERROR) -> None:
        """Log `message` for `key` (a device, or `*`) once while it repeats; a retry that fails alike stays quiet."""
        if self._errors.get(key) != message:
            log.log(level, "%s", message)
        self._errors[key] = message
