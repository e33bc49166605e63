"""`edgefleet keys ...` and `edgefleet approve`: the fleet's signing keys and approvals (docs/governance.md).

Key ceremonies run where the coordinator's data directory is (they open its database, like `edgefleet db`):
root keys stay offline in a directory of their own, encrypted; every change of the root (an approver added or
revoked, a key rotated) is signed by a threshold of them. `edgefleet approve` runs on an approver's machine
and talks to the coordinator's API: the approver's private key never leaves that machine.
"""

from __future__ import annotations

import getpass
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from securesystemslib.signer import CryptoSigner
from sqlmodel import Session, select
from tuf.api.metadata import Metadata, Root, Targets

from cloud import audit
from cloud.cli._common import JsonOpt, TokenOpt, UrlOpt, api_errors, connect, emit, fail
from cloud.errors import CloudError
from cloud.governance.keys import generate_encrypted_key, load_encrypted_signer, load_public_key, online_signer
from cloud.governance.repository import ImageRepository
from cloud.governance.root import new_root, next_root, set_approvers, set_online_key, set_root_keys, sign_root
from cloud.governance.service import init_root_keys
from cloud.models import Approver
from cloud.settings import Settings
from protocol.governance import root_policy

__all__ = ["approve", "keys_app"]

keys_app = typer.Typer(help="The fleet's signing keys: root (offline), online, approvers.", no_args_is_help=True)

DataDirOpt = Annotated[Path | None, typer.Option(help="The coordinator's data dir.")]
ConfigOpt = Annotated[Path | None, typer.Option(help="Coordinator settings file (.toml or .env).", exists=True)]
RootKeyOpt = Annotated[
    list[Path], typer.Option("--root-key", help="An encrypted root key file (repeat up to the threshold).")
]
PassEnvOpt = Annotated[
    str | None, typer.Option(help="Read the passphrase from this environment variable instead of prompting.")
]


def _passphrase(what: str, env: str | None, *, confirm: bool = False) -> str:
    if env:
        value = os.environ.get(env)
        if not value:
            fail(f"environment variable {env} is empty")
        return value
    return str(typer.prompt(f"passphrase of {what}", hide_input=True, confirmation_prompt=confirm))


def _repository(data_dir: Path | None, config: Path | None) -> tuple[Settings, ImageRepository]:
    from cloud.db import create_db_engine, upgrade_db

    try:
        settings = Settings.load(config, data_dir=data_dir)
        engine = create_db_engine(settings.database_url)
        upgrade_db(engine)
    except (CloudError, ValueError) as exc:
        fail(f"cannot open the coordinator's database: {exc}")
    return settings, ImageRepository(engine, settings.resolved_pki_dir)


def _root_signers(paths: list[Path], env: str | None) -> list[CryptoSigner]:
    if not paths:
        fail("give the root keys that sign this change: --root-key FILE (as many as the root threshold)")
    try:
        return [load_encrypted_signer(p, _passphrase(p.name, env)) for p in paths]
    except CloudError as exc:
        fail(str(exc))


def _audit(repository: ImageRepository, action: str, subject: str, details: dict[str, Any]) -> None:
    """Append the key ceremony to the audit log (actor: the operator's login on this machine)."""
    with Session(repository._engine) as session:
        audit.record(session=session, actor=f"keys-cli:{getpass.getuser()}", action=action, subject=subject,
                     details=details)  # fmt: skip
        session.commit()


def _publish_root(repository: ImageRepository, md: Metadata, signers: list[CryptoSigner]) -> int:
    try:
        repository.update_root(sign_root(md, signers))
    except Exception as exc:  # a threshold not met is a tuf UnsignedMetadataError
        fail(f"the new root was refused: {exc} (sign with as many root keys as the threshold)")
    return md.signed.version


@keys_app.command("init")
def init(
    root_keys: Annotated[Path, typer.Option(help="Where the encrypted root keys go (outside the data dir).")],
    count: Annotated[int, typer.Option(min=1, max=9, help="How many root keys.")] = 3,
    threshold: Annotated[int, typer.Option(min=1, max=9, help="How many must sign a root change.")] = 2,
    data_dir: DataDirOpt = None,
    config: ConfigOpt = None,
    passphrase_env: PassEnvOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create the root keys and the first root metadata (before the coordinator's first start in production)."""
    settings, repository = _repository(data_dir, config)
    if root_keys.resolve().is_relative_to(settings.data_dir.resolve()):
        fail(f"{root_keys} is inside the data dir {settings.data_dir}: root keys must stay apart (and offline)")
    if repository.initialized:
        fail("the image repository has root metadata already; rotate with `edgefleet keys rotate-root`")
    passphrase = _passphrase("the new root keys", passphrase_env, confirm=True)
    try:
        paths = init_root_keys(root_keys, passphrase, count)
        signers = [load_encrypted_signer(p, passphrase) for p in paths]
        md = new_root([s.public_key for s in signers], threshold, repository.online_keys(), settings.approval_threshold)
        repository.initialize(sign_root(md, signers))
    except (CloudError, ValueError) as exc:
        fail(str(exc))
    summary = {"root_keys": [str(p) for p in paths], "threshold": threshold, "root_version": 1}
    _audit(repository, "key.added", "root", {"keys": len(paths), "threshold": threshold, "root_version": 1})
    emit(
        summary,
        as_json,
        lambda s: f"root metadata v1 signed by {len(paths)} keys (threshold {threshold}) in {root_keys}",
    )


@keys_app.command("approver-keygen")
def approver_keygen(
    out: Annotated[Path, typer.Option(help="The private key file to write (its .pub goes beside it).")],
    passphrase_env: PassEnvOpt = None,
) -> None:
    """Make an approver's key pair on this machine (the private key never goes to the coordinator)."""
    try:
        key = generate_encrypted_key(out, out.with_suffix(".pub"), _passphrase(out.name, passphrase_env, confirm=True))
    except CloudError as exc:
        fail(str(exc))
    typer.echo(f"approver key {key.keyid[:16]}…: private {out} (encrypted), public {out.with_suffix('.pub')}")


@keys_app.command("add-approver")
def add_approver(
    name: Annotated[str, typer.Argument(help="The approver's name (who signs).")],
    public_key: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="The approver's .pub file.")],
    root_key: RootKeyOpt = [],  # noqa: B006  (typer reads the default)
    threshold: Annotated[int | None, typer.Option(help="Change the approval threshold k too.")] = None,
    data_dir: DataDirOpt = None,
    config: ConfigOpt = None,
    passphrase_env: PassEnvOpt = None,
) -> None:
    """Add an approver to the root's approver set (a new root version, signed by the root keys)."""
    _settings, repository = _repository(data_dir, config)
    try:
        key = load_public_key(public_key)
    except CloudError as exc:
        fail(str(exc))
    with Session(repository._engine) as session:
        root = repository.root(session)
        if session.exec(select(Approver).where(Approver.name == name)).first() is not None:
            fail(f"an approver named {name!r} exists already")
    current = [root.keys[k] for k in root_policy(root).approver_keyids]
    md = next_root(root)
    assert isinstance(md.signed, Root)
    set_approvers(md.signed, [*current, key], threshold)
    version = _publish_root(repository, md, _root_signers(root_key, passphrase_env))
    with Session(repository._engine) as session:
        session.add(Approver(name=name, keyid=key.keyid, public_key=key.to_dict(), added_by="root keys"))
        session.commit()
    _audit(repository, "approver.added", name, {"keyid": key.keyid, "root_version": version, "threshold": threshold})
    typer.echo(f"approver {name} ({key.keyid[:16]}…) added: root v{version}")


@keys_app.command("revoke-approver")
def revoke_approver(
    name: Annotated[str, typer.Argument(help="The approver to revoke.")],
    root_key: RootKeyOpt = [],  # noqa: B006
    data_dir: DataDirOpt = None,
    config: ConfigOpt = None,
    passphrase_env: PassEnvOpt = None,
) -> None:
    """Remove an approver from the root: its signatures stop counting on every device."""
    _settings, repository = _repository(data_dir, config)
    with Session(repository._engine) as session:
        approver = session.exec(select(Approver).where(Approver.name == name)).first()
        if approver is None or approver.revoked_at is not None:
            fail(f"no active approver named {name!r}")
        root = repository.root(session)
    keep = [root.keys[k] for k in root_policy(root).approver_keyids if k != approver.keyid]
    md = next_root(root)
    assert isinstance(md.signed, Root)
    set_approvers(md.signed, keep)
    version = _publish_root(repository, md, _root_signers(root_key, passphrase_env))
    with Session(repository._engine) as session:
        row = session.get(Approver, approver.id)
        assert row is not None
        from protocol.messages import utcnow

        row.revoked_at = utcnow()
        session.add(row)
        session.commit()
    _audit(repository, "approver.revoked", name, {"keyid": approver.keyid, "root_version": version})
    typer.echo(f"approver {name} revoked: root v{version}")


@keys_app.command("rotate")
def rotate(
    role: Annotated[str, typer.Argument(help="targets, snapshot, timestamp or director.")],
    root_key: RootKeyOpt = [],  # noqa: B006
    data_dir: DataDirOpt = None,
    config: ConfigOpt = None,
    passphrase_env: PassEnvOpt = None,
) -> None:
    """Replace an online key: a new key file, and a root version that names it (devices follow the root chain)."""
    if role not in ("targets", "snapshot", "timestamp", "director"):
        fail("rotate one of: targets, snapshot, timestamp, director")
    settings, repository = _repository(data_dir, config)
    path = settings.resolved_pki_dir / "online" / f"{role}.key"
    old = path.with_suffix(".key.old")
    path.replace(old)
    new_key = online_signer(settings.resolved_pki_dir, role).public_key
    with Session(repository._engine) as session:
        md = next_root(repository.root(session))
    assert isinstance(md.signed, Root)
    set_online_key(md.signed, role, new_key)
    try:
        version = _publish_root(repository, md, _root_signers(root_key, passphrase_env))
    except BaseException:
        old.replace(path)  # the root did not change: keep signing with the old key
        raise
    old.unlink()
    _audit(repository, "key.rotated", role, {"keyid": new_key.keyid, "root_version": version})
    typer.echo(f"{role} key rotated ({new_key.keyid[:16]}…): root v{version}")


@keys_app.command("rotate-root")
def rotate_root(
    new_root_keys: Annotated[Path, typer.Option(help="Directory for the new encrypted root keys.")],
    root_key: RootKeyOpt = [],  # noqa: B006
    count: Annotated[int, typer.Option(min=1, max=9)] = 3,
    threshold: Annotated[int, typer.Option(min=1, max=9)] = 2,
    data_dir: DataDirOpt = None,
    config: ConfigOpt = None,
    passphrase_env: PassEnvOpt = None,
) -> None:
    """Replace the root keys: the new root is signed by the old threshold and by the new one."""
    _settings, repository = _repository(data_dir, config)
    old_signers = _root_signers(root_key, passphrase_env)
    passphrase = _passphrase("the new root keys", passphrase_env, confirm=True)
    paths = init_root_keys(new_root_keys, passphrase, count)
    new_signers = [load_encrypted_signer(p, passphrase) for p in paths]
    with Session(repository._engine) as session:
        md = next_root(repository.root(session))
    assert isinstance(md.signed, Root)
    set_root_keys(md.signed, [s.public_key for s in new_signers], threshold)
    version = _publish_root(repository, md, [*old_signers, *new_signers])
    _audit(repository, "key.rotated", "root", {"keys": len(paths), "threshold": threshold, "root_version": version})
    typer.echo(f"root keys rotated: root v{version} signed by the old and the new keys ({new_root_keys})")


@keys_app.command("show")
def show(data_dir: DataDirOpt = None, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """The root: version, expiry, root keys and threshold, online keys, director, approvers."""
    _settings, repository = _repository(data_dir, config)
    with Session(repository._engine) as session:
        root = repository.root(session)
        approvers = {a.keyid: a.name for a in session.exec(select(Approver)) if a.revoked_at is None}
    policy = root_policy(root)
    body: dict[str, Any] = {
        "version": root.version,
        "expires": root.expires.isoformat(),
        "roles": {name: {"keyids": role.keyids, "threshold": role.threshold} for name, role in root.roles.items()},
        "director": sorted(policy.director_keyids),
        "approvers": {k: approvers.get(k, "?") for k in sorted(policy.approver_keyids)},
        "approval_threshold": policy.approval_threshold,
    }
    emit(body, as_json, lambda b: "\n".join(f"{k}: {v}" for k, v in b.items()))


def approve(
    model: Annotated[str, typer.Argument(metavar="NAME:VERSION", help="The high-risk version to approve.")],
    key: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="Your encrypted approver key.")],
    passphrase_env: PassEnvOpt = None,
    yes: Annotated[bool, typer.Option("--yes", help="Sign without asking (after printing what is signed).")] = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Sign a high-risk version's pending metadata with your key (on your machine) and send the signature."""
    name, sep, version = model.partition(":")
    if not sep:
        fail(f"model must be NAME:VERSION, got {model!r}")
    client = connect(url, token)
    with api_errors():
        pending = client.get(f"/approvals/{name}/{version}/pending")
    md = Metadata[Targets].from_dict(dict(pending["metadata"]))
    for path, target in sorted(md.signed.targets.items()):
        custom = target.unrecognized_fields.get("custom", {})
        typer.echo(f"  {path}  sha256={target.hashes.get('sha256')}  card={custom.get('card_sha256')}", err=True)
    if not yes and not typer.confirm(f"approve {model} ({len(md.signed.targets)} targets)?", err=True):
        fail("not approved")
    signer = load_encrypted_signer(key, _passphrase(key.name, passphrase_env))
    signature = signer.sign(md.signed_bytes)
    with api_errors():
        answer = client.post_json(
            f"/approvals/{name}/{version}", {"keyid": signature.keyid, "signature": signature.signature}
        )
    emit(
        answer,
        as_json,
        lambda a: f"{model}: {a['valid']} of {a['threshold']} approvals" + (" — published" if a["published"] else ""),
    )
