"""The relay's Ed25519 signing key: generation, loading, signatures."""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from recorder.errors import CastgateError

PRIVATE_NAME = "signing_ed25519.pem"
PUBLIC_NAME = "signing_ed25519.pub.pem"


class SigningKeyError(CastgateError):
    """A signing key that cannot be read."""


def key_id(public: Ed25519PublicKey) -> str:
    """Short fingerprint of a public key: ``SHA256:`` + base64 of the raw key's hash."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "SHA256:" + base64.b64encode(hashlib.sha256(raw).digest()).decode().rstrip("=")


def public_pem(public: Ed25519PublicKey) -> bytes:
    """PEM (SubjectPublicKeyInfo) of a public key, the form handed to auditors."""
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def public_raw_b64(public: Ed25519PublicKey) -> str:
    """Base64 of the 32 raw public key bytes."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def public_from_raw_b64(text: str) -> Ed25519PublicKey:
    """Inverse of ``public_raw_b64``."""
    return Ed25519PublicKey.from_public_bytes(base64.b64decode(text))


@dataclass(frozen=True)
class SigningKey:
    """The relay's signing key pair."""

    private: Ed25519PrivateKey

    @property
    def public(self) -> Ed25519PublicKey:
        """The public half."""
        return self.private.public_key()

    @property
    def key_id(self) -> str:
        """Fingerprint of the public key."""
        return key_id(self.public)

    def sign(self, message: bytes) -> str:
        """Base64 Ed25519 signature of ``message``."""
        return base64.b64encode(self.private.sign(message)).decode()

    @classmethod
    def generate(cls) -> SigningKey:
        """A fresh key pair."""
        return cls(Ed25519PrivateKey.generate())

    def save(self, keys_dir: Path) -> None:
        """Write the private key (0600) and the public key (0644) into ``keys_dir``."""
        keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        pem = self.private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path = keys_dir / PRIVATE_NAME
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        (keys_dir / PUBLIC_NAME).write_bytes(public_pem(self.public))

    @classmethod
    def load(cls, keys_dir: Path) -> SigningKey:
        """Read the private key from ``keys_dir``."""
        path = keys_dir / PRIVATE_NAME
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except FileNotFoundError:
            raise SigningKeyError(f"{path}: no signing key (run 'castgate init')") from None
        except (OSError, ValueError) as exc:
            raise SigningKeyError(f"{path}: unreadable signing key: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise SigningKeyError(f"{path}: not an Ed25519 key")
        return cls(key)

    @classmethod
    def load_or_create(cls, keys_dir: Path) -> SigningKey:
        """Load the key, generating it on first use."""
        if not (keys_dir / PRIVATE_NAME).exists():
            key = cls.generate()
            key.save(keys_dir)
            return key
        return cls.load(keys_dir)


def load_public(path: Path) -> Ed25519PublicKey:
    """Read a PEM public key (or the private key file, taking its public half)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SigningKeyError(f"{path}: cannot read key: {exc.strerror}") from None
    try:
        if b"PRIVATE KEY" in data:
            priv = serialization.load_pem_private_key(data, password=None)
            if isinstance(priv, Ed25519PrivateKey):
                return priv.public_key()
        else:
            pub = serialization.load_pem_public_key(data)
            if isinstance(pub, Ed25519PublicKey):
                return pub
    except ValueError as exc:
        raise SigningKeyError(f"{path}: not a PEM key: {exc}") from None
    raise SigningKeyError(f"{path}: not an Ed25519 key")


def verify_signature(public: Ed25519PublicKey, message: bytes, signature_b64: str) -> bool:
    """True when ``signature_b64`` is a valid signature of ``message``."""
    try:
        public.verify(base64.b64decode(signature_b64, validate=True), message)
    except (InvalidSignature, ValueError):
        return False
    return True
