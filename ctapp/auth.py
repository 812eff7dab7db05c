"""Who the signed-in user is and what they may do (pure Python; Streamlit's
``st.login`` does the signing in).

Two roles: clinicians diagnose and compare models; admins may also evaluate
models on server folders and read the audit log. Admins are named in the
``[roles]`` section of ``.streamlit/secrets.toml``, beside ``[auth]``::

    [roles]
    admin_emails = ["head.radiologist@example.org"]   # verified e-mail addresses
    admin_claim = "groups"                             # and/or an OIDC claim ...
    admin_claim_values = ["ct-admins"]                 # ... holding one of these values

Everyone else who can sign in at the identity provider is a clinician.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

ADMIN = "admin"
CLINICIAN = "clinician"
ROLE_KEYS = {"admin_emails", "admin_claim", "admin_claim_values"}


class RoleConfigError(ValueError):
    """A ``[roles]`` section that cannot be used (the message says what to fix)."""


@dataclass(frozen=True)
class RoleConfig:
    admin_emails: frozenset[str] = frozenset()
    admin_claim: str = ""
    admin_claim_values: frozenset[str] = frozenset()

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
        return cls(frozenset(e.strip().lower() for e in emails), claim.strip(), frozenset(values))


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


def role(claims: Mapping, config: RoleConfig) -> str:
    email = claims.get("email")
    # An address the provider says it has not verified could be anyone's.
    if isinstance(email, str) and claims.get("email_verified") is not False \
            and email.strip().lower() in config.admin_emails:
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
