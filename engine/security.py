"""The cluster secret: what authenticates traffic between pdserve's own parts and what keys stored KV.

One secret per deployment (a Kubernetes Secret the operator creates per InferenceService; one generated per run
by ``pdserve up``) reaches every pod as the environment variable ``PDSERVE_CLUSTER_SECRET`` (or a file named by
``PDSERVE_CLUSTER_SECRET_FILE``), read once at the entry points. Everything else is derived from it with
HMAC-SHA256 under a purpose label, so one derived key never doubles as another:

- **call tokens** (``sign_call`` / ``verify_call``): router → pod and decode → prefill calls carry
  ``x-pdserve-auth: v1.<unix time>.<nonce>.<mac>`` in their HTTP headers or gRPC metadata; the MAC covers the
  scope (a service or method name) and the time, and a token older than ``CALL_TOKEN_TTL_S`` is refused;
- **signed documents** (``sign`` / ``verify``): KV handles and stored KV blocks carry a MAC over their bytes;
- **the block-hash seed** (``hash_seed``): never sent anywhere, so a reader of a store cannot test whether a
  prompt was seen by hashing it.

Pure standard library: the router, the operator and the engine core import it without torch.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Mapping

SECRET_ENV = "PDSERVE_CLUSTER_SECRET"
SECRET_FILE_ENV = "PDSERVE_CLUSTER_SECRET_FILE"
AUTH_HEADER = "x-pdserve-auth"
CALL_TOKEN_TTL_S = 120.0
# Tokens a little in the future are accepted too: the clocks of two pods are never exactly equal.
CLOCK_SKEW_S = 30.0
MIN_SECRET_BYTES = 16
_TOKEN_VERSION = "v1"


class AuthError(Exception):
    """A call token or a signature did not verify. The message says why and never echoes secret material."""


class ClusterSecret:
    """The deployment's shared secret and the keys derived from it. Immutable; safe to share between threads."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if len(key) < MIN_SECRET_BYTES:
            raise ValueError(f"the cluster secret must be at least {MIN_SECRET_BYTES} bytes, got {len(key)}")
        self._key = bytes(key)

    def __repr__(self) -> str:  # never print the key
        return f"ClusterSecret(fingerprint={self.fingerprint()})"

    @classmethod
    def generate(cls) -> "ClusterSecret":
        """A fresh random secret (``pdserve up`` makes one per run)."""
        return cls(secrets.token_bytes(32))

    @classmethod
    def from_text(cls, text: str) -> "ClusterSecret":
        """Parse the form kept in environment variables and Kubernetes Secrets (see :meth:`to_text`).

        Any other text of at least 16 bytes is taken as the key itself, so an operator may paste a passphrase."""
        text = text.strip()
        if text.startswith("b64:"):
            try:
                return cls(base64.urlsafe_b64decode(text[4:].encode()))
            except ValueError as exc:
                raise ValueError("the cluster secret is not valid base64 after 'b64:'") from exc
        return cls(text.encode())

    def to_text(self) -> str:
        return "b64:" + base64.urlsafe_b64encode(self._key).decode()

    def fingerprint(self) -> str:
        """A short public id of the secret (for logs and metrics: tells two secrets apart, reveals nothing)."""
        return self.derive("fingerprint")[:4].hex()

    def derive(self, purpose: str) -> bytes:
        """A 32-byte key for one purpose; different purposes give unrelated keys."""
        return hmac.new(self._key, b"pdserve-derive:" + purpose.encode(), hashlib.sha256).digest()

    def hash_seed(self) -> int:
        """The block-hash seed (64 bits) derived from the secret: the same on every pod, never sent."""
        return int.from_bytes(self.derive("block-hash-seed")[:8], "little")

    # -- signed documents ---------------------------------------------------------------------------------------

    def sign(self, purpose: str, payload: bytes) -> bytes:
        """HMAC-SHA256 of ``payload`` under the key for ``purpose`` (32 bytes)."""
        return hmac.new(self.derive(purpose), payload, hashlib.sha256).digest()

    def verify(self, purpose: str, payload: bytes, mac: bytes) -> bool:
        """True when ``mac`` is ``sign(purpose, payload)`` (constant-time comparison)."""
        return hmac.compare_digest(self.sign(purpose, payload), bytes(mac))

    # -- call tokens --------------------------------------------------------------------------------------------

    def sign_call(self, scope: str, now: float | None = None) -> str:
        """A token for one call to ``scope`` (for example ``"http"`` or ``"kv"``), valid ``CALL_TOKEN_TTL_S``."""
        stamp = int(time.time() if now is None else now)
        nonce = secrets.token_hex(8)
        mac = self.sign("call", f"{_TOKEN_VERSION}|{scope}|{stamp}|{nonce}".encode()).hex()
        return f"{_TOKEN_VERSION}.{stamp}.{nonce}.{mac}"

    def verify_call(self, scope: str, token: str | None, now: float | None = None) -> None:
        """Raise :class:`AuthError` unless ``token`` is a fresh token for ``scope`` under this secret."""
        if not token:
            raise AuthError(f"missing {AUTH_HEADER}: this endpoint takes calls from pdserve's own parts only")
        parts = token.split(".")
        if len(parts) != 4 or parts[0] != _TOKEN_VERSION or not parts[1].isdigit():
            raise AuthError(f"malformed {AUTH_HEADER} token")
        _, stamp_text, nonce, mac_hex = parts
        try:
            mac = bytes.fromhex(mac_hex)
        except ValueError:
            raise AuthError(f"malformed {AUTH_HEADER} token") from None
        if not self.verify("call", f"{_TOKEN_VERSION}|{scope}|{stamp_text}|{nonce}".encode(), mac):
            raise AuthError(f"{AUTH_HEADER} token does not verify (wrong cluster secret or scope)")
        age = (time.time() if now is None else now) - int(stamp_text)
        if age > CALL_TOKEN_TTL_S or age < -CLOCK_SKEW_S:
            raise AuthError(f"{AUTH_HEADER} token expired")

    def call_headers(self, scope: str) -> dict[str, str]:
        """Headers (or gRPC metadata, as ``list(headers.items())``) that authenticate one call to ``scope``."""
        return {AUTH_HEADER: self.sign_call(scope)}


def load_cluster_secret(environ: Mapping[str, str] | None = None) -> ClusterSecret | None:
    """The secret named by the environment (``PDSERVE_CLUSTER_SECRET`` or ``PDSERVE_CLUSTER_SECRET_FILE``).

    None when neither is set. Called once at each entry point; inner components receive the object."""
    env = os.environ if environ is None else environ
    text = env.get(SECRET_ENV)
    path = env.get(SECRET_FILE_ENV)
    if text and path:
        raise ValueError(f"set only one of {SECRET_ENV} and {SECRET_FILE_ENV}")
    if path:
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except OSError as exc:
            raise ValueError(f"cannot read the cluster secret from {SECRET_FILE_ENV}={path}: {exc.strerror}") from None
    return ClusterSecret.from_text(text) if text else None
