"""The ``[pacs]`` section of ``.streamlit/secrets.toml``: where the PACS's
DICOMweb root is, how to sign in to it (HTTP basic auth or a bearer token),
TLS verification, timeouts, and which roles are shown patient identifiers
(``ctapp.pacs``; docs/deploying.md, "Reading from a PACS")."""
from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from .auth import ADMIN, CLINICIAN, User

SECTION = "pacs"
SETTINGS = {"url", "username", "password", "token", "verify_tls", "ca_bundle", "connect_timeout", "read_timeout",
            "identifiers_for"}


class PacsConfigError(ValueError):
    """A ``[pacs]`` section that cannot be used (the message says what to fix)."""


@dataclass(frozen=True)
class PacsConfig:
    url: str
    username: str = ""
    password: str = field(default="", repr=False)
    token: str = field(default="", repr=False)
    verify: bool | str = True  # False, True or a CA bundle's path
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    identifiers_for: frozenset[str] = frozenset({CLINICIAN, ADMIN})

    @classmethod
    def from_mapping(cls, section: Mapping) -> PacsConfig:
        section = dict(section or {})
        unknown = set(section) - SETTINGS
        if unknown:
            raise PacsConfigError(f"[pacs]: unknown setting(s) {', '.join(sorted(unknown))}; "
                                  f"use {', '.join(sorted(SETTINGS))}")
        url = str(section.get("url", "")).strip().rstrip("/")
        if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname:
            raise PacsConfigError("[pacs]: url must be the DICOMweb root, e.g. https://pacs.example.org/dicom-web")
        if urlsplit(url).username or urlsplit(url).password:
            raise PacsConfigError("[pacs]: put credentials in username and password, not in the url")
        username, password, token = (str(section.get(k, "")) for k in ("username", "password", "token"))
        if token and (username or password):
            raise PacsConfigError("[pacs]: use either username and password (basic auth) or token (bearer), not both")
        if bool(username) != bool(password):
            raise PacsConfigError("[pacs]: username and password go together")
        verify: bool | str = section.get("verify_tls", True)
        if not isinstance(verify, bool):
            raise PacsConfigError("[pacs]: verify_tls is true or false")
        if section.get("ca_bundle"):
            if not verify or not Path(section["ca_bundle"]).is_file():
                raise PacsConfigError("[pacs]: ca_bundle must be a readable certificate file, with verify_tls on")
            verify = str(section["ca_bundle"])
        timeouts = []
        for key, default in (("connect_timeout", 5.0), ("read_timeout", 60.0)):
            value = section.get(key, default)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 3600:
                raise PacsConfigError(f"[pacs]: {key} is a number of seconds between 0 and 3600")
            timeouts.append(float(value))
        roles = section.get("identifiers_for", [CLINICIAN, ADMIN])
        if not isinstance(roles, list) or not set(roles) <= {CLINICIAN, ADMIN}:
            raise PacsConfigError(f"[pacs]: identifiers_for lists roles among {CLINICIAN!r} and {ADMIN!r}")
        return cls(url, username, password, token, verify, *timeouts, frozenset(roles))

    @property
    def host(self) -> str:
        """The PACS as messages name it (no path, no credentials)."""
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc}"


def read_settings(path: str | Path) -> PacsConfig | None:
    """The ``[pacs]`` section of a secrets file; None when it has none."""
    path = Path(path)
    try:
        section = tomllib.loads(path.read_text(encoding="utf-8")).get(SECTION)
    except FileNotFoundError:
        return None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise PacsConfigError(f"{path}: cannot be read as TOML ({type(exc).__name__})") from None
    return PacsConfig.from_mapping(section) if section is not None else None


def may_see_identifiers(user: User | None, config: PacsConfig) -> bool:
    """Only signed-in users whose role the ``[pacs]`` section names."""
    return user is not None and user.role in config.identifiers_for
