"""Helpers for wake-up tests (PROTOCOL.md section 29): the stand-in push distributor of
examples/push_distributor.py, and waiting for its POSTs from trio code."""

from __future__ import annotations

import datetime
import importlib.util
import ipaddress
import queue
import ssl
import sys
from pathlib import Path

import trio


def _load_example() -> object:
    """examples/push_distributor.py, loaded from its file: the examples are scripts, not a
    package (and another distribution installs a top-level `examples`)."""
    name = "pigeon_example_push_distributor"
    if name not in sys.modules:
        path = Path(__file__).resolve().parent.parent / "examples" / "push_distributor.py"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


_example = _load_example()
Distributor = _example.Distributor  # type: ignore[attr-defined]
Post = _example.Post  # type: ignore[attr-defined]

__all__ = ["Distributor", "Post", "next_post", "no_post", "private_ca"]


async def next_post(distributor: Distributor, timeout: float) -> Post:  # type: ignore[valid-type]
    """The distributor's next POST, waited for in a thread (it blocks on a queue, not a sleep)."""
    return await trio.to_thread.run_sync(distributor.wait_post, timeout)


def no_post(distributor: Distributor) -> bool:
    """True if no POST is waiting to be taken now."""
    try:
        post = distributor.wait_post(0)
    except queue.Empty:
        return True
    raise AssertionError(f"unexpected POST to {post.path}")


def private_ca(directory: Path) -> tuple[Path, ssl.SSLContext]:
    """A certificate authority of the test's own and a server certificate it signed for
    "localhost": the CA's PEM file (for the relay's `push_ca_file`) and a server context that
    presents the certificate (for `Distributor.running(tls=...)`)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    valid = (now - datetime.timedelta(hours=1), now + datetime.timedelta(days=1))

    def name(text: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("Pigeon test CA"))
          .issuer_name(name("Pigeon test CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(valid[0]).not_valid_after(valid[1])
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, key_cert_sign=True, crl_sign=True,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder().subject_name(name("localhost")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(valid[0]).not_valid_after(valid[1])
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    ca_file = directory / "ca.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    chain = directory / "server.pem"
    chain.write_bytes(leaf.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(chain)
    return ca_file, server
