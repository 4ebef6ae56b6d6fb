"""Workload tokens issued by this server: what verifies, what is refused and why, revocation
that reaches a running server, and the `xds-server token` commands."""

from __future__ import annotations

import base64
import json
import os
import stat
from datetime import datetime, timedelta, UTC
from pathlib import Path

import jwt
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric import ec

from xds_server.ca.cli import token
from xds_server.ca.tokens import REVOKED_FILE, TOKEN_KEY, TokenIssuer
from xds_server.config import parse_duration
from xds_server.model.identity import AuthError, Identity


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def issuer(tmp_path: Path, clock: Clock) -> TokenIssuer:
    return TokenIssuer(tmp_path / "certs", clock=clock)


def reason(issuer: TokenIssuer, token_value) -> str:
    with pytest.raises(AuthError) as caught:
        issuer.verify(token_value)
    assert caught.value.reason == str(caught.value)
    return caught.value.reason


def b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def test_valid_token_proves_its_identity(tmp_path: Path, issuer: TokenIssuer) -> None:
    issued = issuer.issue("shop", "web", timedelta(hours=24))
    assert issuer.verify(issued.token) == Identity("shop", "web")
    assert issued.identity == Identity("shop", "web")
    assert issued.expires_at - issued.issued_at == timedelta(hours=24)
    assert issued.token not in repr(issued)
    claims = jwt.decode(issued.token, options={"verify_signature": False})
    assert claims["sub"] == "system:serviceaccount:shop:web"
    assert claims["jti"] == issued.token_id
    assert jwt.get_unverified_header(issued.token)["alg"] == "ES256"
    # The key is kept (0600) and reused: a restarted server accepts earlier tokens.
    key_file = tmp_path / "certs" / TOKEN_KEY
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    assert TokenIssuer(tmp_path / "certs").verify(issued.token) == Identity("shop", "web")
    assert isinstance(issuer.verify(issued.token.encode()), Identity)  # bytes from metadata


def test_wrong_signature(issuer: TokenIssuer) -> None:
    web = issuer.create("shop", "web", timedelta(hours=1))
    admin = issuer.create("kube-system", "admin", timedelta(hours=1))
    head, payload, _ = admin.split(".")
    assert "bad signature" in reason(issuer, f"{head}.{payload}.{web.split('.')[2]}")
    # A payload edited to claim another identity no longer matches its signature.
    head, payload, signature = web.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["sub"] = "system:serviceaccount:kube-system:admin"
    assert "bad signature" in reason(issuer, f"{head}.{b64(claims)}.{signature}")


def test_expired(issuer: TokenIssuer, clock: Clock) -> None:
    value = issuer.create("shop", "web", timedelta(hours=1))
    clock.now += timedelta(minutes=59)
    assert issuer.verify(value) == Identity("shop", "web")
    clock.now += timedelta(minutes=2)
    assert "expired" in reason(issuer, value)


def test_not_yet_valid(issuer: TokenIssuer, clock: Clock) -> None:
    value = issuer.create("shop", "web", timedelta(hours=1))
    clock.now -= timedelta(minutes=10)
    assert "not valid yet" in reason(issuer, value)


def test_revoked_is_persisted_and_reaches_a_running_verifier(tmp_path: Path, issuer: TokenIssuer) -> None:
    keep = issuer.issue("shop", "web", timedelta(hours=1))
    drop = issuer.issue("shop", "web", timedelta(hours=1))
    running = TokenIssuer(tmp_path / "certs")  # e.g. the server, already verifying
    assert running.verify(drop.token) == Identity("shop", "web")
    # Another process (the CLI) revokes: the running verifier sees it on the next call.
    assert TokenIssuer(tmp_path / "certs").revoke(drop.token_id) is True
    assert f"token {drop.token_id} was revoked" == reason(running, drop.token)
    assert "revoked" in reason(issuer, drop.token)
    assert running.verify(keep.token) == Identity("shop", "web")
    assert issuer.revoke(drop.token_id) is False, "already revoked"
    saved = json.loads((tmp_path / "certs" / REVOKED_FILE).read_text())
    assert list(saved["revoked"]) == [drop.token_id]
    assert "revoked" in reason(TokenIssuer(tmp_path / "certs"), drop.token)
    with pytest.raises(ValueError):
        issuer.revoke("../../etc/passwd")


def test_an_unreadable_revocation_file_does_not_unrevoke(tmp_path: Path, issuer: TokenIssuer) -> None:
    value = issuer.issue("shop", "web", timedelta(hours=1))
    issuer.revoke(value.token_id)
    assert "revoked" in reason(issuer, value.token)
    (tmp_path / "certs" / REVOKED_FILE).write_text("{not json")
    assert "revoked" in reason(issuer, value.token)


@pytest.mark.parametrize("value", [
    "", "abc", "a.b.c", "a.b", "....", "\x00\xff", b"\xff\xfe", "x" * 10_000, None, 42,
])
def test_malformed(issuer: TokenIssuer, value) -> None:
    assert "malformed" in reason(issuer, value)


def test_unsigned_and_other_algorithms_are_refused(issuer: TokenIssuer) -> None:
    claims = {"iss": "xds-server", "aud": "xds-server", "sub": "system:serviceaccount:shop:web",
              "jti": "abcdefgh12345678", "iat": 0, "nbf": 0, "exp": 4_000_000_000}
    unsigned = f"{b64({'alg': 'none', 'typ': 'JWT', 'kid': issuer.key_id})}.{b64(claims)}."
    assert "algorithm" in reason(issuer, unsigned)
    hs256 = jwt.encode(claims, "secret-secret-secret-secret-32by", algorithm="HS256",
                       headers={"kid": issuer.key_id})
    assert "algorithm" in reason(issuer, hs256)


def test_another_servers_key(tmp_path: Path, issuer: TokenIssuer) -> None:
    other = TokenIssuer(tmp_path / "other-server")
    foreign = other.create("shop", "web", timedelta(hours=1))
    assert "signature" in reason(issuer, foreign)
    # Even when it names our key id, the signature gives it away.
    stranger = ec.generate_private_key(ec.SECP256R1())
    claims = jwt.decode(foreign, options={"verify_signature": False})
    forged = jwt.encode(claims, stranger, algorithm="ES256", headers={"kid": issuer.key_id})
    assert reason(issuer, forged) == "bad signature"


def test_wrong_audience_or_issuer_and_missing_claims(tmp_path: Path, issuer: TokenIssuer) -> None:
    directory = tmp_path / "certs"
    assert "audience" in reason(issuer, TokenIssuer(directory, audience="billing").create(
        "shop", "web", timedelta(hours=1)))
    assert "issuer" in reason(issuer, TokenIssuer(directory, issuer="someone").create(
        "shop", "web", timedelta(hours=1)))
    key = issuer._key  # the right key, but a token missing its id
    now = int(datetime.now(UTC).timestamp())
    no_jti = jwt.encode({"iss": "xds-server", "aud": "xds-server", "sub": "system:serviceaccount:a:b",
                         "iat": now, "nbf": now, "exp": now + 60}, key, algorithm="ES256",
                        headers={"kid": issuer.key_id})
    assert "missing claim 'jti'" in reason(issuer, no_jti)
    bad_sub = jwt.encode({"iss": "xds-server", "aud": "xds-server", "sub": "system:serviceaccount:A/..:b",
                          "jti": "abcdefgh1234", "iat": now, "nbf": now, "exp": now + 60}, key,
                         algorithm="ES256", headers={"kid": issuer.key_id})
    assert "malformed" in reason(issuer, bad_sub)


def test_create_validates_names_and_ttl(issuer: TokenIssuer) -> None:
    for namespace, account in [("Shop", "web"), ("shop", "a/b"), ("shop", "a:b"), ("", "web")]:
        with pytest.raises(ValueError):
            issuer.create(namespace, account, timedelta(hours=1))
    with pytest.raises(ValueError, match="maximum"):
        issuer.create("shop", "web", timedelta(days=400))
    with pytest.raises(ValueError, match="positive"):
        issuer.create("shop", "web", timedelta(0))


def test_parse_duration() -> None:
    """The settings form of the one duration grammar (config.py), as `--ttl` reads it."""

    def lifetime(text: str) -> timedelta:
        return timedelta(seconds=parse_duration(text, settings_form=True))

    assert lifetime("24h") == timedelta(hours=24)
    assert lifetime("1h30m") == timedelta(minutes=90)
    assert lifetime("7d") == timedelta(days=7)
    assert lifetime("90s") == timedelta(seconds=90)
    assert lifetime("4") == timedelta(seconds=4)
    for bad in ("", "h", "24x", "1h 30m", "-1h"):
        with pytest.raises(ValueError):
            lifetime(bad)


def test_cli_create_and_revoke(tmp_path: Path) -> None:
    ca_dir = tmp_path / "certs"
    runner = CliRunner()
    created = runner.invoke(token, ["create", "--namespace", "shop", "--service-account", "web",
                                    "--ttl", "2h", "--ca-dir", str(ca_dir)])
    assert created.exit_code == 0, created.output
    value = created.stdout.strip()
    assert "\n" not in value, "stdout holds the token only"
    verifier = TokenIssuer(ca_dir)
    assert verifier.verify(value) == Identity("shop", "web")
    token_id = jwt.decode(value, options={"verify_signature": False})["jti"]
    assert token_id in created.stderr and "xds-server token revoke" in created.stderr
    exp = jwt.decode(value, options={"verify_signature": False})["exp"]
    assert abs(exp - datetime.now(UTC).timestamp() - 7200) < 10

    revoked = runner.invoke(token, ["revoke", token_id, "--ca-dir", str(ca_dir)])
    assert revoked.exit_code == 0, revoked.output
    assert "revoked" in reason(verifier, value)

    env = {"XDS_SERVER_CA_DIR": str(ca_dir)}
    bad = runner.invoke(token, ["create", "-n", "Shop", "--sa", "web"], env=env)
    assert bad.exit_code != 0 and "invalid namespace" in bad.output
    bad_ttl = runner.invoke(token, ["create", "-n", "shop", "--sa", "web", "--ttl", "soon"], env=env)
    assert bad_ttl.exit_code != 0 and "invalid duration" in bad_ttl.output


def test_a_revoked_identity_voids_what_was_issued_until_then(tmp_path: Path, issuer: TokenIssuer,
                                                             clock: Clock) -> None:
    web, api = Identity("shop", "web"), Identity("shop", "api")
    before = issuer.create("shop", "web", timedelta(hours=1))
    other = issuer.create("shop", "api", timedelta(hours=1))
    revoked_at = issuer.revoke_identity(web)
    with pytest.raises(AuthError, match="revoked identity shop/web"):
        issuer.verify(before)
    assert issuer.verify(other) == api  # another identity is untouched
    # Certificates: the same rule on their issuance time, to the second.
    with pytest.raises(AuthError, match="revoked identity"):
        issuer.check_identity(web, revoked_at)
    issuer.check_identity(web, revoked_at + timedelta(seconds=1))
    # Issued afterwards: good. Seen by another process (the server) through the file, and a
    # token revocation written later keeps the identity's entry.
    clock.now = revoked_at + timedelta(seconds=2)
    after = issuer.create("shop", "web", timedelta(hours=1))
    server_side = TokenIssuer(tmp_path / "certs", clock=clock)
    assert server_side.verify(after) == web
    issuer.revoke(issuer.issue("shop", "api", timedelta(hours=1)).token_id)
    assert server_side.identity_revoked_at(web) == revoked_at
    with pytest.raises(AuthError, match="revoked identity"):
        server_side.verify(before)
