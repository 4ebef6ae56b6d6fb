"""Workload tokens this server issues itself (for workloads outside Kubernetes, or demos).

A token is a compact JWT signed with ES256 (PyJWT over `cryptography`):

    header  {"alg": "ES256", "typ": "JWT", "kid": <first 16 hex of SHA-256 of the public key>}
    claims  {"iss": "xds-server", "aud": "xds-server",
             "sub": "system:serviceaccount:<ns>:<sa>",   (the Kubernetes spelling)
             "jti": <token id>, "iat": ..., "nbf": ..., "exp": ...}

The signing key lives in the CA directory (`token-signing-key.pem`, 0600), created on first
use. Revocations are kept in `revoked-tokens.json` next to it; `verify()` notices when another
process (the `xds-server token revoke` CLI) changed that file, so a revocation applies to a
running server without a restart.

`verify()` raises `AuthError(reason)` with a reason a caller can act on and that never
contains the token: malformed, unsupported algorithm, bad signature (including a token from
another server's key), wrong issuer/audience, not yet valid, expired, revoked.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta, UTC
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .authority import Clock, utcnow
from .files import create_exclusive, ensure_private_dir, write_atomic
from ..model.identity import AuthError, Identity

log = logging.getLogger("xds_server.ca")

TOKEN_KEY = "token-signing-key.pem"
REVOKED_FILE = "revoked-tokens.json"
ISSUER = "xds-server"
AUDIENCE = "xds-server"
ALGORITHM = "ES256"
MAX_TOKEN_TTL = timedelta(days=365)
MAX_TOKEN_BYTES = 8192
LEEWAY = timedelta(seconds=30)
_SUBJECT = re.compile(r"^system:serviceaccount:([^:]+):([^:]+)$")
_TOKEN_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")

__all__ = ["AuthError", "IssuedToken", "TokenIssuer"]


@dataclass(frozen=True)
class IssuedToken:
    token: str = field(repr=False)
    token_id: str
    identity: Identity
    issued_at: datetime
    expires_at: datetime


def _key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    der = public_key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()[:16]


def validate_token_id(token_id: str) -> str:
    if not _TOKEN_ID.match(token_id or ""):
        raise ValueError(f"invalid token id {token_id!r}")
    return token_id


class TokenIssuer:
    """Creates, verifies and revokes workload tokens, with its key in `directory`."""

    def __init__(
        self,
        directory: str | Path = "certs",
        *,
        issuer: str = ISSUER,
        audience: str = AUDIENCE,
        max_ttl: timedelta = MAX_TOKEN_TTL,
        leeway: timedelta = LEEWAY,
        clock: Clock = utcnow,
        key: ec.EllipticCurvePrivateKey | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.issuer = issuer
        self.audience = audience
        self.max_ttl = max_ttl
        self.leeway = leeway
        self.clock = clock
        # `key`: a key held in memory (the CLI acting on shared state): nothing read or written.
        self._key = key if key is not None else self._load_or_create_key()
        self._public_key = self._key.public_key()
        self.key_id = _key_id(self._public_key)
        self._lock = threading.Lock()
        self._revoked: dict[str, str] = {}
        self._revoked_identities: dict[str, str] = {}  # "ns/sa" -> when (ISO 8601)
        self._revoked_stat: tuple[int, int, int] | None = None
        # Revocations made on other replicas (the shared state), besides the file's.
        self._shared_revoked: dict[str, str] = {}

    # -- key -----------------------------------------------------------------------------

    def _load_or_create_key(self) -> ec.EllipticCurvePrivateKey:
        path = self.directory / TOKEN_KEY
        if not path.exists():
            ensure_private_dir(self.directory)
            created = ec.generate_private_key(ec.SECP256R1())
            pem = created.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
            if create_exclusive(path, pem):
                log.info("created the token signing key", extra={"file": str(path),
                                                                 "kid": _key_id(created.public_key())})
                return created
            # Another process created it first: use theirs, or its tokens would not verify.
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except Exception:
            raise ValueError(f"{path}: not a readable unencrypted PEM private key") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
            raise ValueError(f"{path}: the token signing key must be ECDSA P-256 (ES256)")
        return key

    # -- issuing -------------------------------------------------------------------------

    def issue(self, namespace: str, service_account: str, ttl: timedelta) -> IssuedToken:
        identity = Identity(namespace, service_account)  # validates both names
        if ttl <= timedelta(0):
            raise ValueError("the token TTL must be positive")
        if ttl > self.max_ttl:
            raise ValueError(f"the token TTL {ttl} exceeds the maximum {self.max_ttl}")
        now = self.clock().replace(microsecond=0)
        expires = now + ttl
        # Hex: an id is typed on command lines (`token revoke ID`), where one starting with
        # "-" (possible in base64url) would read as an option.
        token_id = secrets.token_hex(16)
        claims = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": f"system:serviceaccount:{namespace}:{service_account}",
            "jti": token_id,
            "iat": int(now.timestamp()),
            "nbf": int(now.timestamp()),
            "exp": int(expires.timestamp()),
        }
        token = jwt.encode(claims, self._key, algorithm=ALGORITHM, headers={"kid": self.key_id})
        log.info("workload token created", extra={"token_id": token_id, "identity": str(identity),
                                                  "expires": expires.isoformat()})
        return IssuedToken(token, token_id, identity, now, expires)

    def create(self, namespace: str, service_account: str, ttl: timedelta) -> str:
        return self.issue(namespace, service_account, ttl).token

    # -- verifying -----------------------------------------------------------------------

    def recognizes(self, token: str) -> bool:
        """Whether a token says it is ours (our key id or issuer), read without verifying:
        decides between local verification and TokenReview, and a forged "ours" still fails
        `verify_claims`."""
        try:
            header = jwt.get_unverified_header(token)
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.InvalidTokenError:
            return False  # opaque: not one of ours
        return header.get("kid") == self.key_id or claims.get("iss") == self.issuer

    def verify(self, token: str) -> Identity:
        """The identity a token proves, or AuthError(reason)."""
        return self.verify_claims(token)[0]

    def verify_claims(self, token: str) -> tuple[Identity, dict]:
        if isinstance(token, bytes):
            try:
                token = token.decode("ascii")
            except UnicodeDecodeError:
                raise AuthError("malformed token") from None
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_BYTES:
            raise AuthError("malformed token")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise AuthError("malformed token: not a compact JWT") from None
        if header.get("alg") != ALGORITHM:
            raise AuthError(f"unsupported token algorithm {str(header.get('alg'))[:16]!r} (expected ES256)")
        if header.get("kid") != self.key_id:
            raise AuthError("bad signature: the token was not signed by this server's key")
        try:
            claims = jwt.decode(
                token, self._public_key, algorithms=[ALGORITHM],
                audience=self.audience, issuer=self.issuer,
                # Time is checked below against our clock (injectable, and one leeway rule).
                options={"verify_exp": False, "verify_nbf": False, "verify_iat": False,
                         "require": ["exp", "iat", "nbf", "jti", "sub", "iss", "aud"]},
            )
        except jwt.InvalidSignatureError:
            raise AuthError("bad signature") from None
        except jwt.InvalidAudienceError:
            raise AuthError("the token is for another audience") from None
        except jwt.InvalidIssuerError:
            raise AuthError("the token is from another issuer") from None
        except jwt.MissingRequiredClaimError as err:
            raise AuthError(f"malformed token: missing claim {err.claim!r}") from None
        except jwt.InvalidTokenError:
            raise AuthError("malformed token") from None
        try:
            exp = datetime.fromtimestamp(int(claims["exp"]), UTC)
            nbf = datetime.fromtimestamp(int(claims["nbf"]), UTC)
            token_id = str(claims["jti"])
            match = _SUBJECT.match(str(claims["sub"]))
            if not match:
                raise ValueError("subject")
            identity = Identity(match.group(1), match.group(2))
        except (ValueError, TypeError, OverflowError, OSError):
            raise AuthError("malformed token: invalid claims") from None
        now = self.clock()
        if now > exp + self.leeway:
            raise AuthError(f"token expired at {exp.isoformat()}")
        if now + self.leeway < nbf:
            raise AuthError("token not valid yet")
        if self.is_revoked(token_id):
            raise AuthError(f"token {token_id} was revoked")
        try:
            issued = datetime.fromtimestamp(int(claims["iat"]), UTC)
        except (ValueError, TypeError, OverflowError, OSError):
            raise AuthError("malformed token: invalid claims") from None
        self.check_identity(identity, issued)
        return identity, claims

    # -- revocation ----------------------------------------------------------------------

    @property
    def revocation_file(self) -> Path:
        return self.directory / REVOKED_FILE

    def _refresh_revoked(self) -> None:
        try:
            st = os.stat(self.revocation_file)
        except FileNotFoundError:
            self._revoked, self._revoked_identities, self._revoked_stat = {}, {}, None
            return
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self._revoked_stat:
            return
        try:
            data = json.loads(self.revocation_file.read_text())
            revoked = {str(k): str(v) for k, v in data.get("revoked", {}).items()}
            identities = {str(k): str(v) for k, v in data.get("identities", {}).items()}
            for when in identities.values():
                datetime.fromisoformat(when)
        except (OSError, ValueError, AttributeError) as err:
            # Keep the revocations we knew: an unreadable file must not un-revoke anything.
            log.error("unreadable revocation file, keeping the previous list: %s", err,
                      extra={"file": str(self.revocation_file)})
            return
        self._revoked, self._revoked_identities, self._revoked_stat = revoked, identities, stamp

    def is_revoked(self, token_id: str) -> bool:
        with self._lock:
            if token_id in self._shared_revoked:
                return True
            self._refresh_revoked()
            return token_id in self._revoked

    def revoked(self) -> dict[str, str]:
        """token id -> when it was revoked (ISO 8601)."""
        with self._lock:
            self._refresh_revoked()
            return {**self._shared_revoked, **self._revoked}

    def add_shared_revocations(self, revoked: dict[str, str]) -> list[str]:
        """Revocations learnt from the shared state (token id -> when); returns the new ids."""
        with self._lock:
            new = [tid for tid in revoked if tid not in self._shared_revoked]
            self._shared_revoked.update(revoked)
            return new

    def revoke(self, token_id: str) -> bool:
        """Revoke a token by id (persisted). False if it was already revoked.

        Entries older than the longest token lifetime are dropped on the way: no token they
        could match is still unexpired.
        """
        validate_token_id(token_id)
        ensure_private_dir(self.directory)
        lock_path = self.directory / f".{REVOKED_FILE}.lock"
        with self._lock, open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # the CLI and the server may both write
            self._revoked_stat = None
            self._refresh_revoked()
            if token_id in self._revoked:
                return False
            now = self.clock()
            keep_after = now - self.max_ttl - self.leeway
            revoked = {}
            for tid, when in self._revoked.items():
                with contextlib.suppress(ValueError):
                    if datetime.fromisoformat(when) < keep_after:
                        continue
                revoked[tid] = when
            revoked[token_id] = now.isoformat()
            self._write_revocations(revoked, self._revoked_identities)
        log.info("workload token revoked", extra={"token_id": token_id})
        return True

    def _write_revocations(self, revoked: dict[str, str], identities: dict[str, str]) -> None:
        write_atomic(self.revocation_file, json.dumps(
            {"revoked": revoked, "identities": identities}, indent=2, sort_keys=True).encode())
        self._revoked, self._revoked_identities, self._revoked_stat = revoked, identities, None

    # -- identities ------------------------------------------------------------------------

    def revoke_identity(self, identity: Identity) -> datetime:
        """Void every credential of `identity` issued up to now (to the second): its workload
        tokens and its certificates. Credentials issued afterwards are good (a compromised
        workload gets new ones once fixed). Returns the revocation time (persisted; a later
        call moves it forward)."""
        ensure_private_dir(self.directory)
        lock_path = self.directory / f".{REVOKED_FILE}.lock"
        with self._lock, open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._revoked_stat = None
            self._refresh_revoked()
            now = self.clock().replace(microsecond=0)
            identities = {**self._revoked_identities, str(identity): now.isoformat()}
            self._write_revocations(dict(self._revoked), identities)
        log.warning("identity revoked: credentials issued until now are refused",
                    extra={"identity": str(identity), "revoked_at": now.isoformat()})
        return now

    def identity_revoked_at(self, identity: Identity) -> datetime | None:
        with self._lock:
            self._refresh_revoked()
            when = self._revoked_identities.get(str(identity))
        return datetime.fromisoformat(when) if when else None

    def check_identity(self, identity: Identity, issued_at: datetime) -> None:
        """Raises AuthError when `identity` was revoked at or after `issued_at` (compared to
        the second: a credential issued in the revocation's second is refused too)."""
        revoked_at = self.identity_revoked_at(identity)
        if revoked_at is not None and issued_at.replace(microsecond=0) <= revoked_at:
            raise AuthError(f"revoked identity {identity}: credentials issued up to "
                            f"{revoked_at.isoformat()} are refused")
