"""The cluster secret: derived keys, signatures and call tokens (engine/security.py)."""

from __future__ import annotations

import pytest

from pdserve.engine.security import (AUTH_HEADER, CALL_TOKEN_TTL_S, AuthError, ClusterSecret,
                                     load_cluster_secret)

A = ClusterSecret(b"a" * 32)
B = ClusterSecret(b"b" * 32)


def test_text_round_trip_and_no_key_in_repr():
    secret = ClusterSecret.generate()
    assert ClusterSecret.from_text(secret.to_text()).derive("x") == secret.derive("x")
    assert secret.to_text()[4:] not in repr(secret)
    assert ClusterSecret.from_text("a passphrase long enough").derive("x") == ClusterSecret(
        b"a passphrase long enough").derive("x")


def test_short_secret_refused():
    with pytest.raises(ValueError, match="at least 16 bytes"):
        ClusterSecret(b"short")


def test_purposes_and_secrets_give_unrelated_keys():
    assert A.derive("kv-handle") != A.derive("kv-block")
    assert A.derive("kv-handle") != B.derive("kv-handle")
    assert A.hash_seed() != B.hash_seed()
    assert 0 <= A.hash_seed() < 2 ** 64


def test_sign_verify():
    mac = A.sign("kv-block", b"payload")
    assert len(mac) == 32
    assert A.verify("kv-block", b"payload", mac)
    assert not A.verify("kv-block", b"payload!", mac)
    assert not A.verify("kv-handle", b"payload", mac)
    assert not B.verify("kv-block", b"payload", mac)


def test_call_token_checks_secret_scope_and_age():
    token = A.sign_call("kv", now=1000.0)
    A.verify_call("kv", token, now=1000.0 + CALL_TOKEN_TTL_S - 1)
    with pytest.raises(AuthError, match="does not verify"):
        B.verify_call("kv", token, now=1000.0)
    with pytest.raises(AuthError, match="does not verify"):
        A.verify_call("http", token, now=1000.0)
    with pytest.raises(AuthError, match="expired"):
        A.verify_call("kv", token, now=1000.0 + CALL_TOKEN_TTL_S + 1)
    with pytest.raises(AuthError, match="expired"):
        A.verify_call("kv", token, now=1000.0 - 3600)
    for bad in (None, "", "v1.x.y.z", "v2.1.2.3", "v1.1000.ab.nothex", token + "0"):
        with pytest.raises(AuthError):
            A.verify_call("kv", bad, now=1000.0)
    assert list(A.call_headers("http")) == [AUTH_HEADER]


def test_load_from_environment(tmp_path):
    assert load_cluster_secret({}) is None
    text = A.to_text()
    assert load_cluster_secret({"PDSERVE_CLUSTER_SECRET": text}).derive("x") == A.derive("x")
    path = tmp_path / "secret"
    path.write_text(text + "\n")
    assert load_cluster_secret({"PDSERVE_CLUSTER_SECRET_FILE": str(path)}).derive("x") == A.derive("x")
    with pytest.raises(ValueError, match="only one"):
        load_cluster_secret({"PDSERVE_CLUSTER_SECRET": text, "PDSERVE_CLUSTER_SECRET_FILE": str(path)})
    with pytest.raises(ValueError, match="cannot read"):
        load_cluster_secret({"PDSERVE_CLUSTER_SECRET_FILE": str(tmp_path / "missing")})
