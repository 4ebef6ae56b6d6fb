"""Who may use the admin API: bearer tokens with a role, from a file or the environment.

    tokens:
      - name: ops                 # shown in logs and metrics; the token never is
        role: admin               # admin: everything; read: every GET of /api
        token_sha256: 5e88...     # hex SHA-256 of the token (preferred: the file holds no secret)
      - name: dashboards
        role: read
        token: "..."              # or the token itself (at least 16 characters)

The document comes from `--admin-tokens-file` (YAML or JSON) and/or the environment variable
`XDS_SERVER_ADMIN_TOKENS` (the same document, for a Kubernetes Secret mounted as env). Tokens
never live in the repository. Only SHA-256 digests are kept in memory, and a presented token
is compared with every digest in constant time (`hmac.compare_digest`), so neither timing nor a
memory dump reveals a token. A token is high-entropy by requirement (`xds-server admin-token
create` makes one), which is why a plain hash, not a password hash, is the right tool.

With no tokens configured every `/api` request is refused (401): the API is closed by default.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from ..config import ConfigError

ENV_TOKENS = "XDS_SERVER_ADMIN_TOKENS"
MIN_TOKEN_LENGTH = 16


class Role(IntEnum):
    READ = 1
    ADMIN = 2


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated admin API caller: the token's name and role, never the token."""

    name: str
    role: Role

    def may(self, role: Role) -> bool:
        return self.role >= role


class _TokenSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    role: Literal["read", "admin"]
    token: SecretStr | None = Field(default=None, min_length=MIN_TOKEN_LENGTH, max_length=4096)
    token_sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")

    @model_validator(mode="after")
    def _one_secret(self) -> _TokenSpec:
        if (self.token is None) == (self.token_sha256 is None):
            raise ValueError("give exactly one of 'token' or 'token_sha256'")
        return self


class _TokensDocument(BaseModel):
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    tokens: list[_TokenSpec] = Field(default_factory=list)


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def new_token() -> str:
    """A fresh random token (256 bits) for an operator to hand out."""
    return secrets.token_urlsafe(32)


@dataclass(frozen=True, slots=True)
class _Entry:
    name: str
    digest: bytes
    role: Role


class TokenStore:
    """The configured tokens, as digests. `authenticate` is constant-time in the token."""

    def __init__(self, entries: list[_Entry] | tuple[_Entry, ...] = ()) -> None:
        self._entries = tuple(entries)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self._entries]

    @classmethod
    def from_tokens(cls, tokens: Mapping[str, tuple[str, Role | str]]) -> TokenStore:
        """name -> (token, role): for tests and embedding."""
        return cls([_Entry(name, digest(token), Role[str(role.name if isinstance(role, Role) else role).upper()])
                    for name, (token, role) in tokens.items()])

    @classmethod
    def parse(cls, text: str, origin: str) -> TokenStore:
        """Parse a tokens document (YAML or JSON). Errors name `origin` and the field, never a
        token value."""
        try:
            data = yaml.safe_load(text) if text.strip() else {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark is not None else ""
            raise ConfigError(f"{origin}: not valid YAML or JSON{where}") from None
        if data is None:
            data = {}
        try:
            document = _TokensDocument.model_validate(data)
        except ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '(document)'}: {e['msg']}"
                for e in err.errors(include_input=False)
            )
            raise ConfigError(f"{origin}: {problems}") from None
        entries: list[_Entry] = []
        seen: set[str] = set()
        for index, spec in enumerate(document.tokens):
            if spec.name in seen:
                raise ConfigError(f"{origin}: tokens[{index}].name: duplicate name {spec.name!r}")
            seen.add(spec.name)
            if spec.token is not None:
                value = digest(spec.token.get_secret_value())
            else:
                assert spec.token_sha256 is not None
                value = bytes.fromhex(spec.token_sha256)
            entries.append(_Entry(spec.name, value, Role[spec.role.upper()]))
        return cls(entries)

    @classmethod
    def load(cls, file: Path | None = None, environ: Mapping[str, str] | None = None) -> TokenStore:
        """Tokens from `file` and from $XDS_SERVER_ADMIN_TOKENS (both may be given)."""
        environ = os.environ if environ is None else environ
        entries: list[_Entry] = []
        if file is not None:
            try:
                text = Path(file).read_text(encoding="utf-8")
            except OSError as err:
                raise ConfigError(f"--admin-tokens-file {file}: cannot read ({err.strerror or err})") from None
            entries += cls.parse(text, f"--admin-tokens-file {file}")._entries
        env_text = environ.get(ENV_TOKENS)
        if env_text:
            entries += cls.parse(env_text, f"${ENV_TOKENS}")._entries
        names = [e.name for e in entries]
        duplicate = next((n for n in names if names.count(n) > 1), None)
        if duplicate is not None:
            raise ConfigError(f"admin token name {duplicate!r} is defined twice "
                              f"(--admin-tokens-file and ${ENV_TOKENS})")
        return cls(entries)

    def authenticate(self, token: str) -> Principal | None:
        """The principal a token belongs to, or None. Every digest is compared, in constant
        time, whichever matches."""
        presented = digest(token)
        found: _Entry | None = None
        for entry in self._entries:
            if hmac.compare_digest(presented, entry.digest) and found is None:
                found = entry
        return Principal(found.name, found.role) if found is not None else None


def parse_bearer(header: str | None) -> tuple[str | None, str | None]:
    """(token, None) from an `Authorization: Bearer <token>` header, or (None, reason)."""
    if header is None or not header.strip():
        return None, "missing"
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None, "malformed"
    return token.strip(), None


def document_for(tokens: Mapping[str, tuple[str, str]]) -> str:
    """A tokens document holding only digests: what `xds-server admin-token create` prints."""
    return json.dumps({"tokens": [
        {"name": name, "role": role, "token_sha256": digest(token).hex()}
        for name, (token, role) in tokens.items()
    ]}, indent=2)
