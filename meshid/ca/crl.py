"""Certificate revocation lists, built and signed by the CA. Verifiers read and check them with
:mod:`meshid.revocation` (:class:`~meshid.RevocationList`, :class:`~meshid.CrlWatcher`)."""

from __future__ import annotations

import datetime
from collections.abc import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshid.ca.authority import Authority, hash_for
from meshid.ca.store import IssuedRecord

__all__ = ["build_crl"]


def build_crl(
    authority: Authority,
    revoked: Iterable[IssuedRecord],
    *,
    number: int,
    now: datetime.datetime,
    next_update: datetime.timedelta = datetime.timedelta(hours=1),
) -> bytes:
    """A DER CRL signed by ``authority`` listing ``revoked``, with a CRL number and AKI."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(authority.certificate.subject)
        .last_update(now)
        .next_update(now + next_update)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                authority.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            ),
            critical=False,
        )
    )
    for record in revoked:
        assert record.revoked_at is not None
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(record.serial).revocation_date(record.revoked_at).build()
        )
    crl = builder.sign(authority.private_key, hash_for(authority.private_key))  # type: ignore[arg-type]
    return crl.public_bytes(serialization.Encoding.DER)
