"""The trust-gate tests' fleet: a real ImageRepository on SQLite, encrypted root and approver keys, the
metadata route on a real HTTP server whose answers a test can replace, and one enrolled device."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote

from securesystemslib.signer import CryptoSigner, SSlibKey
from sqlalchemy.engine import Engine
from sqlmodel import Session
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.api.serialization.json import JSONSerializer

from agent.identity import DeviceIdentity
from agent.trust import TrustGate
from cloud.db import create_db_engine, init_db
from cloud.errors import NotFoundError
from cloud.governance.director import sign_instruction
from cloud.governance.keys import generate_encrypted_key, load_encrypted_signer, online_signer
from cloud.governance.repository import ImageRepository
from cloud.governance.root import new_root, next_root, set_approvers, sign_root
from cloud.governance.service import init_root_keys
from protocol import ArtifactRef, DesiredState, ModelFormat, ModelSpec, TensorSpec
from protocol.governance import high_role, target_path

DEVICE = "dev-1"
PASSPHRASE = "correct horse battery staple"
PREFIX = "/api/v1/tuf/metadata/"
MiB = 1024 * 1024
SERIALIZER = JSONSerializer(compact=False)

Writer = Callable[[BaseHTTPRequestHandler], None]


# -- the coordinator's metadata route, on a real HTTP server -----------------------------------------------


class RepositoryServer:
    """`GET /api/v1/tuf/metadata/{file}` from `ImageRepository.file`, unless `served` says otherwise (an attacker)."""

    def __init__(self, engine: Engine, repository: ImageRepository) -> None:
        self._engine = engine
        self._repository = repository
        self.served: dict[str, bytes | Writer] = {}  # request file name (as sent, %-encoded) -> bytes or writer
        self.requests: list[str] = []
        self.sent: dict[str, int] = {}  # bytes a writer got out before the client hung up
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> RepositoryServer:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def answer(self, request: BaseHTTPRequestHandler) -> None:
        name = request.path.removeprefix(PREFIX)
        if name == request.path or "/" in name:
            request.send_error(404)
            return
        self.requests.append(name)
        body = self.served.get(name)
        if callable(body):
            body(request)
            return
        if body is None:
            try:
                with Session(self._engine) as session:
                    body = self._repository.file(session, name)
            except NotFoundError:
                request.send_error(404)
                return
        request.send_response(200)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)

    def endless(self, name: str, limit: int = 128 * MiB) -> Writer:
        """A writer that sends whitespace until the client hangs up (or `limit` bytes went out)."""

        def write(request: BaseHTTPRequestHandler) -> None:
            request.send_response(200)
            request.send_header("Content-Type", "application/json")
            request.end_headers()
            chunk = b" " * (64 * 1024)
            self.sent[name] = 0
            try:
                while self.sent[name] < limit:
                    request.wfile.write(chunk)
                    self.sent[name] += len(chunk)
            except OSError:  # the client hung up: that is the point
                pass

        return write


def _handler(server: RepositoryServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            server.answer(self)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


def truncated_response(request: BaseHTTPRequestHandler) -> None:
    """Announce 100 kB, send 10 bytes, drop the connection (a network that fails mid-download)."""
    request.send_response(200)
    request.send_header("Content-Type", "application/json")
    request.send_header("Content-Length", "100000")
    request.end_headers()
    request.wfile.write(b'{"signed":')
    request.wfile.flush()
    request.close_connection = True


def unavailable_response(request: BaseHTTPRequestHandler) -> None:
    request.send_error(503, "the coordinator is restarting")


# -- a fleet: repository, root keys, approvers, one enrolled device ----------------------------------------


@dataclass
class Clock:
    """The repository's clock (a test sets it in the past to make it sign already-expired metadata)."""

    now: datetime = field(default_factory=lambda: datetime.now(UTC))

    def __call__(self) -> datetime:
        return self.now


def make_target(model: str, version: str, data: bytes, risk: str = "low", fmt: str = "onnx") -> TargetFile:
    """A target as `cloud.governance.service.target_file` makes it (variant `fp32`)."""
    path = target_path(risk, model, version, "fp32", fmt)
    custom = {
        "model": model,
        "version": version,
        "variant": "fp32",
        "format": fmt,
        "risk": risk,
        "card_sha256": None,
        "lineage": {"parent_version": None, "run": None, "variant_of": "fp32"},
    }
    digest = hashlib.sha256(data).hexdigest()
    return TargetFile(len(data), {"sha256": digest}, path, unrecognized_fields={"custom": custom})


@dataclass
class Fleet:
    """The coordinator's repository and keys, the server in front of it, and one device that trusts its root."""

    tmp: Path
    engine: Engine
    pki_dir: Path
    clock: Clock
    repository: ImageRepository
    root_signers: list[CryptoSigner]
    approvers: list[CryptoSigner]
    server: RepositoryServer
    identity: DeviceIdentity

    @property
    def metadata_dir(self) -> Path:
        return self.tmp / "device" / "tuf"

    # -- the coordinator -----------------------------------------------------------------------------

    def file(self, name: str) -> bytes:
        """The bytes the repository serves as `name`."""
        with Session(self.engine) as session:
            return self.repository.file(session, name)

    def metadata(self, role: str) -> Metadata[Any]:
        """The newest published metadata of `role` (a fresh copy to edit)."""
        with Session(self.engine) as session:
            return self.repository.metadata(session, role)

    def root(self) -> Root:
        with Session(self.engine) as session:
            return self.repository.root(session)

    def publish_low(self, model: str, version: str, data: bytes) -> TargetFile:
        target = make_target(model, version, data)
        self.repository.publish_low({target.path: target})
        return target

    def prepare_high(self, model: str, version: str, data: bytes) -> TargetFile:
        target = make_target(model, version, data, risk="high")
        self.repository.prepare_high(high_role(model, version), {target.path: target})
        return target

    def approve(self, target: TargetFile, signer: CryptoSigner) -> tuple[int, bool]:
        """`signer` signs the pending role's exact bytes, as `edgefleet approvals sign` does."""
        role = role_of(target)
        with Session(self.engine) as session:
            md = Metadata[Targets].from_bytes(self.repository.pending(session, role).data.encode())
        signature = signer.sign(md.signed_bytes)
        return self.repository.add_signature(role, signer.public_key.keyid, signature.signature)

    def publish_high(self, model: str, version: str, data: bytes) -> TargetFile:
        target = self.prepare_high(model, version, data)
        for signer in self.approvers:
            self.approve(target, signer)
        return target

    def new_approver(self, name: str) -> CryptoSigner:
        return approver_key(self.tmp / "approvers", name)

    def next_root(self, approvers: list[SSlibKey], signers: list[CryptoSigner], threshold: int | None = None) -> Any:
        """The next root version with `approvers`, signed by `signers` (as `edgefleet keys` would)."""
        md = next_root(self.root())
        assert isinstance(md.signed, Root)
        set_approvers(md.signed, approvers, threshold)
        return sign_root(md, signers)

    def instruct(
        self, target: TargetFile, generation: int = 1, *, device_id: str = DEVICE, now: datetime | None = None
    ) -> str:
        """The director's instruction, signed by the coordinator's director key."""
        return sign_instruction(self.pki_dir, device_id=device_id, generation=generation, target=target, now=now)

    # -- the attacker (a man in the middle, or a thief of the online keys) -----------------------------

    def online(self, role: str) -> CryptoSigner:
        """A stolen online key (they live unencrypted on the coordinator)."""
        return online_signer(self.pki_dir, role)

    def resigned(self, role: str, edit: Callable[[Any], None], key: str | None = None) -> Metadata[Any]:
        """The newest `role`, edited, as the next version, signed with the online key `key` (default: its own)."""
        md = self.metadata(role)
        edit(md.signed)
        md.signed.version += 1
        md.signatures.clear()
        md.sign(self.online(key or role))
        return md

    def forge(self, roles: dict[str, Metadata[Any]]) -> None:
        """Serve `roles` with a new snapshot listing them and a new timestamp, signed with the stolen online keys."""
        snapshot = self.metadata("snapshot")
        assert isinstance(snapshot.signed, Snapshot)
        for name, md in roles.items():
            snapshot.signed.meta[f"{name}.json"] = MetaFile(md.signed.version)
            self.server.served[f"{md.signed.version}.{quote(name, '')}.json"] = md.to_bytes(SERIALIZER)
        snapshot.signed.version += 1
        snapshot.signatures.clear()
        snapshot.sign(self.online("snapshot"))
        self.server.served[f"{snapshot.signed.version}.snapshot.json"] = snapshot.to_bytes(SERIALIZER)
        timestamp = self.metadata("timestamp")
        assert isinstance(timestamp.signed, Timestamp)
        timestamp.signed.version += 1
        timestamp.signed.snapshot_meta = MetaFile(snapshot.signed.version)
        timestamp.signatures.clear()
        timestamp.sign(self.online("timestamp"))
        self.server.served["timestamp.json"] = timestamp.to_bytes(SERIALIZER)

    # -- the device ----------------------------------------------------------------------------------

    def desired(
        self,
        target: TargetFile,
        generation: int = 1,
        *,
        director: str | None = None,
        sha256: str | None = None,
        size: int | None = None,
        **model: Any,
    ) -> DesiredState:
        """The MQTT message: unsigned model fields (overridable, to lie) and the director's signed instruction."""
        custom = target.unrecognized_fields["custom"]
        spec = ModelSpec(
            name=model.get("name", custom["model"]),
            version=model.get("version", custom["version"]),
            artifact=ArtifactRef(
                url="http://127.0.0.1:9/artifact",
                sha256=sha256 or target.hashes["sha256"],
                size=target.length if size is None else size,
                format=ModelFormat(model.get("format", custom["format"])),
            ),
            inputs=[TensorSpec(name="input", datatype="FP32", shape=[-1, 64])],
            variant=model.get("variant", custom["variant"]),
        )
        instruction = self.instruct(target, generation) if director is None else director
        return DesiredState(device_id=DEVICE, generation=generation, model=spec, director=instruction)

    def check(self, desired: DesiredState) -> DesiredState:
        return TrustGate(self.identity, self.metadata_dir, timeout_s=5.0).check(desired)

    def trusted_root_version(self) -> int:
        return Metadata[Root].from_file(str(self.metadata_dir / "root.json")).signed.version


def approver_key(directory: Path, name: str) -> CryptoSigner:
    """An approver's key, made as `edgefleet keys approver-keygen` makes it (encrypted, on their machine)."""
    directory.mkdir(exist_ok=True)
    generate_encrypted_key(directory / f"{name}.key", directory / f"{name}.pub", PASSPHRASE)
    return load_encrypted_signer(directory / f"{name}.key", PASSPHRASE)


def role_of(target: TargetFile) -> str:
    _risk, model, version, _file = target.path.split("/")
    return high_role(model, version)


@contextmanager
def build_fleet(tmp_path: Path, clock: Clock) -> Iterator[Fleet]:
    engine = create_db_engine(f"sqlite:///{tmp_path / 'coordinator.db'}")
    init_db(engine)
    pki_dir = tmp_path / "pki"
    repository = ImageRepository(engine, pki_dir, clock=clock)
    root_signers = [load_encrypted_signer(p, PASSPHRASE) for p in init_root_keys(tmp_path / "root-keys", PASSPHRASE)]
    approvers = [approver_key(tmp_path / "approvers", name) for name in ("alice", "bob")]
    md = new_root([s.public_key for s in root_signers], 2, repository.online_keys(), 2)
    assert isinstance(md.signed, Root)
    set_approvers(md.signed, [a.public_key for a in approvers])
    repository.initialize(sign_root(md, root_signers[:2]))  # a threshold: 2 of the 3 root keys
    directory = tmp_path / "device" / "identity"
    directory.mkdir(parents=True)
    with Session(engine) as session:  # what enrolment gives the device
        (directory / "root.json").write_bytes(repository.file(session, "root.json"))
    with RepositoryServer(engine, repository) as server:
        identity = DeviceIdentity(
            directory=directory,
            device_id=DEVICE,
            broker_url="mqtts://127.0.0.1:8883",
            topic_base="edgefleet/v1",
            coordinator_url=server.url,
            tags={},
            tuf_url=f"{server.url}{PREFIX}",
        )
        yield Fleet(tmp_path, engine, pki_dir, clock, repository, root_signers, approvers, server, identity)
    engine.dispose()
