"""Governance at run time: sign what the policy allows, prepare what needs approvals, sign director instructions.

`Governance.sync()` signs every unsigned low-risk version into the `low` role (after the push's checks) and
turns every unsigned high-risk version that has a model card into a pending role approvers sign. Versions become
deployable only once signed. `Governance.instruction()` signs the per-device director instruction a desired
state carries. On a development coordinator without root metadata, `ensure_initialized()` creates the root keys
itself (in `<data_dir>.root-keys/`, outside the data directory, encrypted with a generated passphrase kept
beside them) — production refuses to start until `edgefleet keys init` was run.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select
from tuf.api.metadata import Metadata, TargetFile, Targets

from cloud.errors import CloudError, ConfigurationError, ConflictError
from cloud.governance.director import INSTRUCTION_TTL, Director
from cloud.governance.keys import KeyStamp, generate_encrypted_key, load_encrypted_signer, online_key_stamp
from cloud.governance.repository import ImageRepository
from cloud.governance.root import new_root, sign_root
from cloud.models import Device, EnrolmentState, ModelCard, ModelVersion
from cloud.pki import private_write
from cloud.settings import Environment, Settings
from cloud.variant_policy import Variant, version_variants
from protocol.governance import high_role, target_path
from protocol.messages import DesiredState

__all__ = ["Governance", "default_root_keys_dir", "init_root_keys", "target_file"]

log = logging.getLogger(__name__)

ROOT_KEY_COUNT = 3
ROOT_THRESHOLD = 2


def default_root_keys_dir(settings: Settings) -> Path:
    """Where root keys live unless configured: beside (never inside) the data directory."""
    return settings.root_keys_dir or Path(f"{settings.data_dir.resolve()}.root-keys")


def init_root_keys(keys_dir: Path, passphrase: str, count: int = ROOT_KEY_COUNT) -> list[Path]:
    """Make `count` encrypted root keys in `keys_dir`; returns the private key paths."""
    keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    paths = []
    for index in range(1, count + 1):
        private = keys_dir / f"root-{index}.key"
        generate_encrypted_key(private, keys_dir / f"root-{index}.pub", passphrase)
        paths.append(private)
    return paths


def target_file(record: ModelVersion, variant: Variant, card: ModelCard | None) -> TargetFile:
    """The TUF target of one variant: its digest and length, and what the version is (custom metadata).

    Lineage comes from the model card (`parent_version`, `run`: e.g. `--set parent_version=1.0 --set
    run=train-2026-11-30`) and from the version itself (`variant_of`: the primary variant a compressed one was
    made from).
    """
    path = target_path(record.risk_class, record.name, record.version, variant.name, variant.format.value)
    extra = dict((card.card or {}).get("extra") or {}) if card else {}
    custom = {
        "model": record.name,
        "version": record.version,
        "variant": variant.name,
        "format": variant.format.value,
        "risk": record.risk_class,
        "card_sha256": card.sha256 if card else None,
        # What drift is measured against and how the outputs read: signed with the artifact, so a device (and an
        # auditor) can tell the profile and semantics the coordinator uses are the publisher's.
        "profile_sha256": record.profile_sha256,
        "output_semantics": record.output_semantics,
        "lineage": {
            "parent_version": _text(extra.get("parent_version")),
            "run": _text(extra.get("run")),
            "variant_of": None if variant.name == record.primary_variant else record.primary_variant,
        },
    }
    return TargetFile(variant.size, {"sha256": variant.sha256}, path, unrecognized_fields={"custom": custom})


def _text(value: object) -> str | None:
    return None if value is None else str(value)


class Governance:
    """The coordinator's signing side of governance."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self._engine = engine
        self._settings = settings
        self.pki_dir = settings.resolved_pki_dir
        self.repository = ImageRepository(engine, self.pki_dir)
        # The last record instructions were signed for, its card and targets; the director key and its file's stamp.
        self._targets: tuple[ModelVersion | None, ModelCard | None, dict[tuple[str, str], TargetFile]] = (
            None,
            None,
            {},
        )
        self._signing: tuple[KeyStamp | None, Director | None] = (None, None)

    def ensure_initialized(self) -> None:
        """Root metadata exists (created here on a development coordinator); then sign what is due."""
        if not self.repository.initialized:
            if self._settings.environment is Environment.PRODUCTION:
                raise ConfigurationError(
                    "no root metadata: run `edgefleet keys init` (root keys stay offline, outside the data dir)"
                )
            self._development_root()
        self.sync()

    def _development_root(self) -> None:
        keys_dir = default_root_keys_dir(self._settings)
        passphrase_file = keys_dir / "passphrase"
        passphrase = os.environ.get("EDGEFLEET_ROOT_PASSPHRASE") or secrets.token_urlsafe(24)
        paths = init_root_keys(keys_dir, passphrase)
        if "EDGEFLEET_ROOT_PASSPHRASE" not in os.environ:
            private_write(passphrase_file, (passphrase + "\n").encode())
        signers = [load_encrypted_signer(p, passphrase) for p in paths]
        online = self.repository.online_keys()
        md = new_root([s.public_key for s in signers], ROOT_THRESHOLD, online, self._approval_threshold)
        self.repository.initialize(sign_root(md, signers))
        log.warning(
            "development root keys created in %s (encrypted; passphrase in %s) — production runs `edgefleet keys init`",
            keys_dir,
            passphrase_file,
        )

    @property
    def _approval_threshold(self) -> int:
        return int(getattr(self._settings, "approval_threshold", 2))

    # -- signing versions ----------------------------------------------------------------------------

    def sync(self) -> list[str]:
        """Sign every unsigned version the policy allows; returns `name:version (state)` of what changed."""
        changed = []
        for record, card in self._unsigned():
            try:
                changed.append(self._sign_version(record, card))
            except CloudError as exc:  # e.g. a high-risk version without a card: it waits, the reason is logged
                log.info("version %s:%s not signed: %s", record.name, record.version, exc)
        return changed

    def _unsigned(self) -> Iterator[tuple[ModelVersion, ModelCard | None]]:
        with Session(self._engine) as session:
            rows = list(session.exec(select(ModelVersion).where(ModelVersion.signing_state == "unsigned")))
            cards = {c.model_version_id: c for c in session.exec(select(ModelCard))}
        for record in rows:
            yield record, cards.get(record.id or 0)

    def _sign_version(self, record: ModelVersion, card: ModelCard | None) -> str:
        if record.risk_class == "high" and card is None:
            raise CloudError(f"{record.name}:{record.version} is high risk and has no model card yet")
        targets = {t.path: t for t in (target_file(record, v, card) for v in version_variants(record))}
        if record.risk_class == "high":
            self.repository.prepare_high(high_role(record.name, record.version), targets)
            state = "awaiting_approval"
        else:
            self.repository.publish_low(targets)
            state = "signed"
        self._set_state(record, state)
        return f"{record.name}:{record.version} ({state})"

    def _set_state(self, record: ModelVersion, state: str) -> None:
        with Session(self._engine) as session:
            fresh = session.get(ModelVersion, record.id)
            if fresh is not None:
                fresh.signing_state = state
                session.add(fresh)
                session.commit()

    def before_variant(self, record: ModelVersion) -> None:
        """Refuse a new variant of a high-risk version the approvers signed (they signed its variants)."""
        if record.risk_class == "high" and record.signing_state == "signed":
            raise ConflictError(
                f"{record.name}:{record.version} is high risk and approved as it is; push a new version"
            )

    def version_changed(self, record: ModelVersion) -> None:
        """A version's targets changed (a variant was added): it is signed again (pending approvals start over)."""
        if record.risk_class == "high" and record.signing_state == "awaiting_approval":
            self.repository.discard_pending(high_role(record.name, record.version))
        self._set_state(record, "unsigned")

    def approve(self, *, name: str, version: str, keyid: str, signature: str, actor: str) -> tuple[int, bool]:
        """Record an approver's signature on a version's pending role; `(valid, published)`."""
        valid, published = self.repository.add_signature(high_role(name, version), keyid, signature, actor=actor)
        if published:
            with Session(self._engine) as session:
                record = session.exec(
                    select(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == version)
                ).first()
                if record is not None:
                    self._set_state(record, "signed")
        return valid, published

    # -- director --------------------------------------------------------------------------------------

    def instruction(self, *, device_id: str, generation: int, record: ModelVersion, variant: Variant) -> str:
        """The director's signed instruction for `device_id` to install `variant` of `record` as `generation`.

        A wave signs one loaded `record` device after device: its card is read and its target built once for that
        object, not once a device, and the director key is read again only when its file changed (a rotation).
        """
        target = self._target(record, variant)
        return self._director().sign(device_id=device_id, generation=generation, target=target)

    def _target(self, record: ModelVersion, variant: Variant) -> TargetFile:
        held, card, targets = self._targets
        if held is not record:
            with Session(self._engine) as session:
                card = session.exec(select(ModelCard).where(ModelCard.model_version_id == record.id)).first()
            targets = {}
            self._targets = (record, card, targets)
        key = (variant.name, variant.sha256)
        if key not in targets:
            targets[key] = target_file(record, variant, card)
        return targets[key]

    def _director(self) -> Director:
        held, director = self._signing
        stamp = online_key_stamp(self.pki_dir, "director")
        if director is None or stamp != held:
            director = Director(self.pki_dir)  # creates the key on first use: stamped once it exists
            self._signing = (stamp or online_key_stamp(self.pki_dir, "director"), director)
        return director

    def renew_instructions(self, now: datetime | None = None) -> list[DesiredState]:
        """Re-sign instructions that pass half their lifetime, or whose director key was rotated, before their
        device converged; returns the states.

        Same generation, same target, a fresh expiry: a device offline for longer than `INSTRUCTION_TTL` finds a
        valid instruction when it returns. The caller publishes the returned states. A state that changed
        meanwhile (a newer deployment) is left alone: the update only applies to the generation it read.
        """
        now = now or datetime.now(UTC)
        renewed = []
        director: Director | None = None
        with Session(self._engine) as session:
            director_keys = self.repository.policy(session).director_keyids
            rows = session.exec(
                select(Device).where(
                    col(Device.desired_state).is_not(None), Device.enrolment == EnrolmentState.ENROLLED.value
                )
            ).all()
            for device in rows:
                if not device.desired_state:  # a JSON null
                    continue
                state = DesiredState.model_validate(device.desired_state)
                converged = device.reported_generation is not None and device.reported_generation >= state.generation
                if state.director is None or converged:
                    continue
                signed_md = Metadata[Targets].from_bytes(state.director.encode())
                old = signed_md.signed
                current_key = bool(set(signed_md.signatures) & director_keys)
                if current_key and old.expires - now >= INSTRUCTION_TTL / 2:
                    continue
                target = next(iter(old.targets.values()))
                director = director or Director(self.pki_dir)
                signed = director.sign(device_id=device.id, generation=state.generation, target=target, now=now)
                fresh = state.model_copy(update={"director": signed})
                statement = (
                    update(Device)
                    .where(col(Device.id) == device.id, col(Device.desired_generation) == state.generation)
                    .values(desired_state=fresh.model_dump(mode="json"))
                    .execution_options(synchronize_session=False)
                )
                if session.exec(statement).rowcount == 1:
                    renewed.append(fresh)
            session.commit()
        if renewed:
            log.info("director instructions renewed for %d devices", len(renewed))
        return renewed

    def root_json(self) -> str:
        """The newest root metadata (what devices trust; given to them at enrolment)."""
        with Session(self._engine) as session:
            return self.repository.file(session, "root.json").decode()
