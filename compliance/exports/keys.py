"""Per-project secrets of the export domain, wrapped by the key provider's KEK, the pseudonym map, and
the sealed disclosure lists of export requests (:func:`seal_disclosure`, :func:`open_disclosure`).

Each project has three independent 256-bit secrets, created on first use and stored only wrapped
(``export_project_key``) by the active KEK of the crypto domain's key provider
(:class:`compliance.crypto.interfaces.KeyProvider`, the KEK ids being those of ``crypto_kek``):

- ``pseudonym``: the HMAC key of every pseudonym the de-identification engine makes
  (:class:`ProviderPseudonymSecretSource`, the engine's ``PseudonymSecretSource``);
- ``map``: the AES-256-GCM key of the pseudonym map and of the sealed disclosure lists;
- ``bundle``: the data key of the project's bundles (:mod:`compliance.crypto.streaming`, key id
  ``export-project:<project>:bundle``; every bundle still gets its own content key).

Wrapping context: ``b"export project key\\0" || project || 0 || purpose``, so a wrapped key copied to
another row does not unwrap. Unwrapped keys are not cached across calls.

Keys are created only for a registered project (``registered``, the project registry of
:mod:`compliance.exports.projects`): a name nobody registered never gets keys; keys that exist stay
readable (a bundle of a project closed since is still downloadable until it expires).

Known limit: ``compliance keys rewrap`` (crypto domain) rewraps patient data keys only; these rows
stay under the KEK that wrapped them, so that KEK must not be destroyed while a project is in use
(:meth:`ProjectKeyStore.rewrap` exists for the operator).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime

from sqlalchemy import exc as sa_exc
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from compliance.crypto.aead import new_key, open_sealed, seal
from compliance.crypto.interfaces import DecryptionError, KeyProvider, KeyProviderError, KeyStateConflict
from compliance.crypto.models import CryptoKek
from compliance.crypto.streaming import Header
from compliance.exports.interfaces import DisclosedPatient, DisclosedStudy, Disclosure
from compliance.exports.models import ExportProjectKey, ExportPseudonym

PURPOSES = ("pseudonym", "map", "bundle")
BUNDLE_KEY_PREFIX = "export-project:"


def _utcnow() -> datetime:
    return datetime.now(UTC)


def bundle_key_id(project: str) -> str:
    return f"{BUNDLE_KEY_PREFIX}{project}:bundle"


class ProjectKeyStore:
    def __init__(self, sessions: sessionmaker[Session], provider: KeyProvider, *,
                 create_kek_if_missing: bool = False, clock: Callable[[], datetime] = _utcnow,
                 registered: Callable[[str], bool] | None = None) -> None:
        """``create_kek_if_missing`` (development only): create the first KEK when none is active.
        ``registered``: whether a project may get new keys (None: any, for tools and tests)."""
        self._sessions = sessions
        self._provider = provider
        self._create_kek = create_kek_if_missing
        self._clock = clock
        self._registered = registered

    @staticmethod
    def _context(project: str, purpose: str) -> bytes:
        return b"export project key\x00" + project.encode() + b"\x00" + purpose.encode()

    def _active_kek(self, session: Session) -> str:
        kek = session.scalars(select(CryptoKek).where(CryptoKek.state == "active")).one_or_none()
        if kek is not None:
            return kek.id
        if not self._create_kek:
            raise KeyProviderError("no active key-encryption key; run the key set-up (compliance keys rotate)")
        kek_id = self._provider.create_kek()
        with self._sessions() as other, other.begin():
            other.add(CryptoKek(id=kek_id, provider=self._provider.name, state="active", created_at=self._clock()))
        return kek_id

    def key(self, project: str, purpose: str) -> bytes:
        if purpose not in PURPOSES:
            raise ValueError(f"unknown key purpose {purpose!r}")
        context = self._context(project, purpose)
        for _ in range(3):
            with self._sessions() as session:
                row = session.get(ExportProjectKey, (project, purpose))
                if row is not None:
                    return self._provider.unwrap(row.kek_id, row.wrapped_key, context=context)
                if self._registered is not None and not self._registered(project):
                    raise KeyStateConflict(f"no keys are created for project {project!r}: it is not registered")
                try:
                    kek_id = self._active_kek(session)
                except sa_exc.IntegrityError:
                    continue  # another process created the first KEK at the same moment
                key = new_key()
                session.add(ExportProjectKey(project=project, purpose=purpose, kek_id=kek_id,
                                             wrapped_key=self._provider.wrap(kek_id, key, context=context),
                                             created_at=self._clock()))
                try:
                    session.commit()
                except sa_exc.IntegrityError:
                    session.rollback()
                    continue
                return key
        raise KeyStateConflict("could not create the project's key")

    def rewrap(self) -> int:
        """Rewrap every project key under the active KEK; return how many moved."""
        moved = 0
        with self._sessions() as session, session.begin():
            active = self._active_kek(session)
            for row in session.scalars(select(ExportProjectKey).where(ExportProjectKey.kek_id != active)):
                context = self._context(row.project, row.purpose)
                key = self._provider.unwrap(row.kek_id, row.wrapped_key, context=context)
                row.wrapped_key = self._provider.wrap(active, key, context=context)
                row.kek_id = active
                moved += 1
        return moved

    def unwrap_bundle_header(self, header: Header) -> bytes:
        """The ``unwrap`` callback of :func:`compliance.crypto.streaming.iter_decrypt` for bundles."""
        kid = header.key_id
        if not (kid.startswith(BUNDLE_KEY_PREFIX) and kid.endswith(":bundle")):
            raise DecryptionError()
        return self.key(kid[len(BUNDLE_KEY_PREFIX):-len(":bundle")], "bundle")


class ProviderPseudonymSecretSource:
    """The engine's ``PseudonymSecretSource`` backed by the key provider: one secret per project."""

    def __init__(self, keys: ProjectKeyStore) -> None:
        self._keys = keys

    def secret_for_project(self, project: str) -> bytes:
        return self._keys.key(project, "pseudonym")


def _map_aad(project: str, kind: str, pseudonym: str) -> bytes:
    return b"export pseudonym map v1\x00" + "\x00".join((project, kind, pseudonym)).encode()


class PseudonymMap:
    """``(project, kind, pseudonym) -> original``, the original sealed under the project's map key."""

    def __init__(self, sessions: sessionmaker[Session], keys: ProjectKeyStore,
                 clock: Callable[[], datetime] = _utcnow) -> None:
        self._sessions = sessions
        self._keys = keys
        self._clock = clock

    def record(self, project: str, entries: set[tuple[str, str, str]]) -> int:
        """Record (kind, original, pseudonym) triples not yet known; return how many were new."""
        if not entries:
            return 0
        key = self._keys.key(project, "map")
        by_pseudonym = {(kind, pseudonym): original for kind, original, pseudonym in entries}
        with self._sessions() as session:
            known: set[tuple[str, str]] = set()
            kinds = {k for k, _ in by_pseudonym}
            for kind in kinds:
                names = [p for k, p in by_pseudonym if k == kind]
                for start in range(0, len(names), 500):
                    known.update((kind, p) for p in session.scalars(
                        select(ExportPseudonym.pseudonym).where(
                            ExportPseudonym.project == project, ExportPseudonym.kind == kind,
                            ExportPseudonym.pseudonym.in_(names[start:start + 500]))))
            new = [(k, p, o) for (k, p), o in by_pseudonym.items() if (k, p) not in known]
            now = self._clock()
            for kind, pseudonym, original in new:
                session.add(ExportPseudonym(project=project, kind=kind, pseudonym=pseudonym, created_at=now,
                                            original_sealed=seal(key, original.encode("utf-8"),
                                                                 _map_aad(project, kind, pseudonym))))
            try:
                session.commit()
            except sa_exc.IntegrityError:
                # A concurrent job recorded some of them: the pseudonyms are deterministic, so the
                # rows are equal; record one at a time, skipping the ones that exist.
                session.rollback()
                for kind, pseudonym, original in new:
                    try:
                        with self._sessions() as row_session, row_session.begin():
                            if row_session.get(ExportPseudonym, (project, kind, pseudonym)) is None:
                                row_session.add(ExportPseudonym(
                                    project=project, kind=kind, pseudonym=pseudonym, created_at=now,
                                    original_sealed=seal(key, original.encode("utf-8"),
                                                         _map_aad(project, kind, pseudonym))))
                    except sa_exc.IntegrityError:
                        pass
        return len(new)

    def lookup(self, project: str, kind: str, pseudonym: str) -> str | None:
        with self._sessions() as session:
            row = session.get(ExportPseudonym, (project, kind, pseudonym))
            if row is None:
                return None
            sealed = row.original_sealed
        return open_sealed(self._keys.key(project, "map"), sealed,
                           _map_aad(project, kind, pseudonym)).decode("utf-8")


def disclosure_aad(request_id: str) -> bytes:
    return b"export disclosure v1\x00" + request_id.encode()


def seal_disclosure(keys: ProjectKeyStore, project: str, request_id: str, patients: list[DisclosedPatient],
                    studies: list[DisclosedStudy]) -> bytes:
    """What a request disclosed, sealed under its project's map key (``export_request.disclosure_sealed``)."""
    disclosure = json.dumps({"patients": patients, "studies": studies}, sort_keys=True).encode()
    return seal(keys.key(project, "map"), disclosure, disclosure_aad(request_id))


def open_disclosure(keys: ProjectKeyStore, project: str, request_id: str, sealed: bytes) -> Disclosure:
    disclosure: Disclosure = json.loads(open_sealed(keys.key(project, "map"), sealed, disclosure_aad(request_id)))
    return disclosure
