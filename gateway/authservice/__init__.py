"""The reference auth service (``join-gateway auth``): host CA, SSH CA, registrations.

See DESIGN §4. Operators may put their own auth service behind the same contract
(``POST /v1/register`` over mTLS); this one backs the demo, the tests and the benchmarks.
"""

from __future__ import annotations

from gateway.authservice.app import AuthService, AuthSettings, make_auth_app
from gateway.authservice.authority import (
    DEFAULT_CERT_TTL,
    AuthPaths,
    CaPins,
    HostAuthority,
    ca_pin_for_data_dir,
    ca_pins_for_data_dir,
    ensure_authorities,
    init_auth_dir,
)
from gateway.authservice.registry import (
    HostLocked,
    HostRecord,
    Lock,
    LockTarget,
    Registry,
    open_registry,
)
from gateway.authservice.store import RegistrationRecord
from gateway.authservice.wire import AuthServiceError, ErrorCode, decode_registration

__all__ = [
    "DEFAULT_CERT_TTL",
    "AuthPaths",
    "AuthService",
    "AuthServiceError",
    "AuthSettings",
    "CaPins",
    "ErrorCode",
    "HostAuthority",
    "HostLocked",
    "HostRecord",
    "Lock",
    "LockTarget",
    "RegistrationRecord",
    "Registry",
    "ca_pin_for_data_dir",
    "ca_pins_for_data_dir",
    "decode_registration",
    "ensure_authorities",
    "init_auth_dir",
    "make_auth_app",
    "open_registry",
]
