"""TLS secrets for gateway servers, kept in the mesh state directory.

Istio's Gateway names its certificate with ``credentialName``, a Kubernetes
secret. Here `meshctl secret create tls NAME --cert FILE --key FILE
[--ca-cert FILE]` stores one as::

    <state dir>/secrets/            0700
      NAME/                         0700
        tls.crt                     0644  certificate chain (PEM)
        tls.key                     0600  private key (PEM)
        ca.crt                      0644  CA for client certificates (MUTUAL), optional

Istio's names for the keys, so a CA may also come from a secret
``NAME-cacert``. Files are written to a temporary name and renamed into
place, so a gateway never reads half a secret; a replaced secret is picked up
by running gateways (proxy/gateway_tls.py) without a restart. Keys are never
printed: ``list`` shows the certificate's subject, names and expiry.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

CERT, KEY, CA = "tls.crt", "tls.key", "ca.crt"


class SecretError(Exception):
    pass


def secrets_dir(state_dir: Path) -> Path:
    return state_dir / "secrets"


_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"


def _name_ok(name: str) -> bool:
    """A Kubernetes Secret name: a DNS-1123 subdomain (dot-separated lowercase labels,
    at most 253 characters), so never a path ('/', '..')."""
    import re

    return len(name) <= 253 and re.fullmatch(rf"{_LABEL}(\.{_LABEL})*", name) is not None


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a secret's name, or None."""
    if _name_ok(name):
        return None
    return (f"{name!r} is not a valid secret name: a Kubernetes Secret name is lowercase letters, digits, "
            "'-' and '.' (dot-separated labels that start and end with a letter or digit, at most 253 characters)")


def check_pair(cert_pem: bytes, key_pem: bytes, what: str = "") -> list[x509.Certificate]:
    """The certificate chain, after checking the key is its leaf's; SecretError otherwise."""
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError as exc:
        raise SecretError(f"{what}not a PEM certificate: {exc}") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise SecretError(f"{what}not an unencrypted PEM private key: {exc}") from None
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, pub) != chain[0].public_key().public_bytes(serialization.Encoding.DER, pub):
        raise SecretError(f"{what}the private key does not match the certificate")
    return chain


def create_tls(state_dir: Path, name: str, cert: Path, key: Path, ca: Path | None = None, *, replace: bool = False) -> Path:
    if not _name_ok(name):
        raise SecretError(f"{name!r} is not a secret name (lower-case letters, digits, '-', '.')")
    try:
        cert_pem, key_pem = cert.read_bytes(), key.read_bytes()
        ca_pem = ca.read_bytes() if ca is not None else None
    except OSError as exc:
        raise SecretError(f"cannot read {exc.filename}: {exc.strerror}") from None
    check_pair(cert_pem, key_pem, f"{cert} / {key}: ")
    if ca_pem is not None:
        try:
            x509.load_pem_x509_certificates(ca_pem)
        except ValueError as exc:
            raise SecretError(f"{ca}: not a PEM certificate: {exc}") from None
    base = secrets_dir(state_dir)
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(base, 0o700)
    d = base / name
    if d.exists() and not replace:
        raise SecretError(f"secret {name!r} already exists (use --replace to replace it)")
    d.mkdir(mode=0o700, exist_ok=True)
    files = [(KEY, key_pem, 0o600), (CERT, cert_pem, 0o644)] + ([(CA, ca_pem, 0o644)] if ca_pem is not None else [])
    for fname, data, mode in files:
        tmp = d / f".{fname}.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        tmp.replace(d / fname)
    if ca_pem is None and (d / CA).exists():
        (d / CA).unlink()
    return d


@dataclass(frozen=True)
class SecretInfo:
    name: str
    keys: tuple[str, ...]
    subject: str
    names: tuple[str, ...]
    not_after: datetime | None


def list_secrets(state_dir: Path) -> list[SecretInfo]:
    base = secrets_dir(state_dir)
    out = []
    for d in sorted(base.iterdir()) if base.is_dir() else ():
        if not d.is_dir():
            continue
        keys = tuple(k for k in (CERT, KEY, CA) if (d / k).is_file())
        subject, not_after = "", None
        names: tuple[str, ...] = ()
        if (d / CERT).is_file():
            try:
                leaf = x509.load_pem_x509_certificates((d / CERT).read_bytes())[0]
                subject = leaf.subject.rfc4514_string()
                try:
                    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                    names = tuple(san.get_values_for_type(x509.DNSName))
                except x509.ExtensionNotFound:
                    pass
                not_after = leaf.not_valid_after_utc
            except (ValueError, OSError):
                subject = "(unreadable certificate)"
        elif (d / CA).is_file():
            subject = "(CA only)"
        out.append(SecretInfo(d.name, keys, subject, names, not_after))
    return out


def delete(state_dir: Path, name: str) -> None:
    d = secrets_dir(state_dir) / name
    if not _name_ok(name) or not d.is_dir():
        raise SecretError(f"secret {name!r} not found")
    shutil.rmtree(d)


def check_credential(state_dir: Path | None, name: str, mutual: bool) -> str | None:
    """Why Gateway ``credentialName: name`` cannot serve, or None (route apply's check)."""
    if (bad := name_problem(name)) is not None:
        return bad
    if state_dir is None:
        return f"credentialName {name!r}: no mesh state directory to find the secret in"
    d = secrets_dir(state_dir) / name
    if not (d / CERT).is_file() or not (d / KEY).is_file():
        return (f"secret {name!r} not found: create it first with "
                f"`meshctl secret create tls {name} --cert FILE --key FILE{' --ca-cert FILE' if mutual else ''}`")
    try:
        check_pair((d / CERT).read_bytes(), (d / KEY).read_bytes(), f"secret {name!r}: ")
    except SecretError as exc:
        return str(exc)
    except OSError as exc:
        return f"secret {name!r}: cannot read {exc.filename}: {exc.strerror}"
    if mutual and not (d / CA).is_file() and not (secrets_dir(state_dir) / f"{name}-cacert" / CA).is_file():
        return (f"secret {name!r} has no CA certificate to check client certificates with: "
                f"`meshctl secret create tls {name} --cert FILE --key FILE --ca-cert FILE --replace`")
    return None


def check_files(cert: str | None, key: str | None, ca: str | None, mutual: bool) -> str | None:
    """Why serverCertificate/privateKey/caCertificates cannot serve, or None."""
    if not cert or not key:
        return "needs credentialName, or serverCertificate and privateKey"
    try:
        check_pair(Path(cert).read_bytes(), Path(key).read_bytes(), f"{cert} / {key}: ")
    except SecretError as exc:
        return str(exc)
    except OSError as exc:
        return f"cannot read {exc.filename}: {exc.strerror}"
    if mutual and not ca:
        return "mode needs caCertificates to check client certificates"
    if ca and not Path(ca).is_file():
        return f"caCertificates {ca}: no such file"
    return None
