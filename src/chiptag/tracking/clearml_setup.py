"""ClearML set-up that must happen before `Task.init`: process-wide settings and a fast server check.

ClearML itself retries an unreachable server for minutes and, on close, waits for a reporter subprocess;
chiptag probes the server with a short timeout first and switches the subprocess off, so a run neither hangs
before training nor stalls at the end.
"""

from __future__ import annotations

import base64
import socket
import urllib.error
import urllib.request

from chiptag.errors import ChiptagError

# With the reporter subprocess on (ClearML's default on Linux), Task.close() waits for it to drain and exit:
# measured 5.9 s per run offline on 2 cores against 0.02 s in-process (benchmarks/clearml_overhead.py).
_OVERRIDES = {"sdk": {"development": {"report_use_subprocess": False}}}


def configure() -> None:
    """Apply chiptag's ClearML overrides on top of the user's clearml.conf (credentials stay untouched)."""
    from clearml.config import config_obj

    if config_obj.get("sdk.development.report_use_subprocess", None) is not False:
        config_obj.set_overrides(_OVERRIDES)  # re-parses every config file: once per process is enough


def server_settings() -> tuple[str, str, str]:
    """(api server, access key, secret key) the way ClearML resolves them: environment first, then clearml.conf."""
    from clearml.backend_api.session.defs import ENV_ACCESS_KEY, ENV_HOST, ENV_SECRET_KEY
    from clearml.config import config_obj

    host = ENV_HOST.get() or config_obj.get("api.api_server", "") or ""
    key = ENV_ACCESS_KEY.get() or config_obj.get("api.credentials.access_key", "") or ""
    secret = ENV_SECRET_KEY.get() or config_obj.get("api.credentials.secret_key", "") or ""
    return str(host).rstrip("/"), str(key), str(secret)


_HINT = ("run `clearml-init` (or set CLEARML_API_HOST, CLEARML_API_ACCESS_KEY, CLEARML_API_SECRET_KEY), "
         "or track offline with --set tracking.offline=true")


def check_server(timeout_s: float) -> str:
    """Log in to the configured api server once, within `timeout_s`; return its address or raise ChiptagError."""
    host, key, secret = server_settings()
    if not host:
        raise ChiptagError(f"tracking.backend is clearml but no ClearML api server is configured: {_HINT}")
    if not (key and secret):
        raise ChiptagError(f"tracking.backend is clearml but there are no ClearML credentials for {host}: {_HINT}")
    token = base64.b64encode(f"{key}:{secret}".encode()).decode()
    req = urllib.request.Request(f"{host}/auth.login", headers={"Authorization": f"Basic {token}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s):
            return host
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise ChiptagError(f"the ClearML server {host} rejected the credentials (HTTP {exc.code}): "
                               f"check api.credentials in clearml.conf or CLEARML_API_ACCESS_KEY") from None
        raise ChiptagError(f"the ClearML server {host} answered HTTP {exc.code} to a login: is "
                           f"api.api_server the api address (usually port 8008)?") from None
    except (urllib.error.URLError, socket.timeout, TimeoutError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ChiptagError(f"cannot reach the ClearML server {host} within {timeout_s:g}s ({reason}); "
                           f"start it, fix api.api_server, or track offline with --set tracking.offline=true "
                           f"(or tracking.fallback_offline=true to do so automatically)") from None
