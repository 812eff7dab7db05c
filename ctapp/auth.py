"""Who the signed-in user is and what they may do (pure Python; Streamlit's
``st.login`` does the signing in).

Two roles: clinicians diagnose and compare models; admins may also evaluate
models on server folders and read the audit log. Admins are named in the
``[roles]`` section of ``.streamlit/secrets.toml``, beside ``[auth]``::

    [roles]
    admin_emails = ["head.radiologist@example.org"]   # verified e-mail addresses
    admin_claim = "groups"                             # and/or an OIDC claim ...
    admin_claim_values = ["ct-admins"]                 # ... holding one of these values
    # only for a provider that verifies every address and sends no email_verified claim:
    emails_verified_by_provider = true

An e-mail address makes an admin only when the provider says it verified it
(``email_verified`` true); without ``emails_verified_by_provider`` a missing
claim counts as unverified. Everyone else who can sign in at the identity
provider is a clinician.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

ADMIN = "admin"
CLINICIAN = "clinician"
ROLE_KEYS = {"admin_emails", "admin_claim", "admin_claim_values", "emails_verified_by_provider"}


class RoleConfigError(ValueError):
    """A ``[roles]`` section that cannot be used (the message says what to fix)."""


@dataclass(frozen=True)
class RoleConfig:
    admin_emails: frozenset[str] = frozenset()
    admin_claim: str = ""
    admin_claim_values: frozenset[str] = frozenset()
    emails_verified_by_provider: bool = False

    @classmethod
    def from_mapping(cls, section: Mapping | None) -> RoleConfig:
        section = dict(section or {})
        unknown = set(section) - ROLE_KEYS
        if unknown:
            raise RoleConfigError(f"[roles]: unknown setting(s) {', '.join(sorted(unknown))}; "
                                  f"use {', '.join(sorted(ROLE_KEYS))}")
        emails = _strings(section.get("admin_emails", []), "admin_emails")
        claim = section.get("admin_claim", "")
        if not isinstance(claim, str):
            raise RoleConfigError("[roles]: admin_claim must be the name of one claim, e.g. \"groups\"")
        values = _strings(section.get("admin_claim_values", []), "admin_claim_values")
        if bool(claim) != bool(values):
            raise RoleConfigError("[roles]: admin_claim and admin_claim_values go together")
        verified_by_provider = section.get("emails_verified_by_provider", False)
        if not isinstance(verified_by_provider, bool):
            raise RoleConfigError("[roles]: emails_verified_by_provider must be true or false")
        return cls(frozenset(e.strip().lower() for e in emails), claim.strip(), frozenset(values),
                   verified_by_provider)


@dataclass(frozen=True)
class User:
    identity: str  # what the audit log records: the e-mail address, else the OIDC subject
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == ADMIN


def identity(claims: Mapping) -> str:
    """The e-mail address of a signed-in user, or their OIDC subject when the
    provider gives no e-mail address."""
    for key in ("email", "sub"):
        value = claims.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    raise ValueError("the identity provider gave neither an e-mail address nor a subject for this user")


def email_verified(claims: Mapping, config: RoleConfig) -> bool:
    """Whether the provider vouches for the user's e-mail address: ``email_verified``
    true (some providers send the string "true"); absent, only where the roles
    config says the provider verifies every address. An unverified address
    could be anyone's."""
    claim = claims.get("email_verified")
    if claim is None:
        return config.emails_verified_by_provider
    return claim is True or (isinstance(claim, str) and claim.strip().lower() == "true")


def role(claims: Mapping, config: RoleConfig) -> str:
    email = claims.get("email")
    if isinstance(email, str) and email.strip().lower() in config.admin_emails and email_verified(claims, config):
        return ADMIN
    if config.admin_claim:
        value = claims.get(config.admin_claim)
        held = {value} if isinstance(value, str) else set(value) if isinstance(value, (list, tuple, set)) else set()
        if held & config.admin_claim_values:
            return ADMIN
    return CLINICIAN


def user_from_claims(claims: Mapping, config: RoleConfig) -> User:
    return User(identity(claims), role(claims, config))


def _strings(value, name: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v.strip() for v in value):
        raise RoleConfigError(f"[roles]: {name} must be a list of non-empty strings")
    return list(value)
