"""Who may talk to the control plane: the mesh credential and per-proxy credentials.

istiod hands config only to a caller that proves the workload's identity. On a
laptop, meshctl does the same with two kinds of bearer credential, sent as
``Authorization: Bearer <credential>`` to Pilot and Mixer:

- **the mesh credential**: a random secret in ``<state-dir>/auth/mesh.token``
  (file 0600 in a 0700 directory, like the CA's key), readable only by the
  user who runs the mesh. The CLI and the supervisor send it; it may do
  anything (apply rules, register instances, read every proxy's config).
- **a proxy credential**: ``proxy.<name>.<HMAC-SHA256(mesh secret, name)>``,
  minted by whoever holds the mesh secret (the supervisor, or `meshctl proxy
  run --state-dir` run by the mesh's user) and handed to the sidecar at
  bootstrap in a 0600 file it deletes after reading (never argv, never the
  environment). It names one proxy (one workload instance) and lets it do
  only that proxy's things: PUT its node, long-poll and ACK its config,
  register and keep alive its own instance, draw its own Mixer quotas.

Why a per-proxy credential rather than mTLS with the SVID: an SVID names a
service account (``.../sa/reviews``), which every instance of a service
shares, whereas Pilot's unit is one proxy (``reviews-v2-0``); Pilot and Mixer
serve plain HTTP on loopback; a sidecar must reach Pilot and start from its
last good config while Citadel is down or before its first certificate; and
meshes without Citadel run sidecars with no SVID at all. The HMAC needs no
state on the server (a restarted Pilot verifies at once) and a restarted
sidecar is handed the same credential again.

Pure functions (plus the file handling of the mesh secret); the HTTP servers
call ``authenticate`` and decide with ``Caller``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

AUTH_DIR = "auth"
MESH_TOKEN_FILE = "mesh.token"
PROXY_PREFIX = "proxy."
MESH_PREFIX = "mesh."
BOOTSTRAP_DIR = "bootstrap"
ENV_BOOTSTRAP = "MESHCTL_BOOTSTRAP_FILE"  # path of the sidecar's one-time bootstrap file


class CredentialError(Exception):
    """The mesh credential cannot be read or created (names the file)."""


class Unauthenticated(Exception):
    """No credential, or one that does not verify: HTTP 401."""


class Forbidden(Exception):
    """A valid credential that may not do this: HTTP 403."""


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated caller: the mesh's user, or one named proxy."""

    kind: str  # "mesh" | "proxy"
    proxy: str = ""

    @property
    def is_mesh(self) -> bool:
        return self.kind == "mesh"

    def describe(self) -> str:
        return "the mesh credential" if self.is_mesh else f"proxy {self.proxy}'s credential"

    def require_mesh(self, what: str) -> None:
        if not self.is_mesh:
            raise Forbidden(f"{what} needs the mesh credential; {self.describe()} may not")

    def require_proxy(self, name: str, what: str) -> None:
        """The mesh, or the proxy ``name`` itself."""
        if not self.is_mesh and self.proxy != name:
            raise Forbidden(f"{what} of proxy {name}: {self.describe()} may act only for proxy {self.proxy}")


def mesh_token_path(state_dir: Path) -> Path:
    return Path(state_dir) / AUTH_DIR / MESH_TOKEN_FILE


def private_dir(path: Path) -> Path:
    """``mkdir -p`` with mode 0700 (and chmod an existing one to 0700)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def write_private(path: Path, data: bytes | str) -> None:
    """Write ``path`` as a 0600 file (atomic rename), its directory 0700."""
    private_dir(path.parent)
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, raw)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def mesh_credential(state_dir: Path, *, create: bool = True) -> str:
    """The mesh secret of ``state_dir``, created (0600) on first use when ``create``."""
    path = mesh_token_path(state_dir)
    try:
        text = path.read_text().strip()
        if text:
            return text
    except FileNotFoundError:
        if not create:
            raise CredentialError(f"no mesh credential at {path}: start the mesh with `meshctl up` first") from None
    except OSError as e:
        raise CredentialError(f"cannot read the mesh credential {path}: {e.strerror or e}") from None
    if not create:
        raise CredentialError(f"the mesh credential {path} is empty")
    private_dir(path.parent)
    token = MESH_PREFIX + secrets.token_urlsafe(32)
    try:  # O_EXCL: two processes starting at once agree on one secret
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for _ in range(100):
            text = path.read_text().strip()
            if text:
                return text
            import time

            time.sleep(0.01)
        raise CredentialError(f"the mesh credential {path} stays empty") from None
    try:
        os.write(fd, token.encode())
    finally:
        os.close(fd)
    return token


def proxy_credential(mesh_secret: str, proxy: str) -> str:
    """The credential of proxy ``proxy``, derived from the mesh secret."""
    return f"{PROXY_PREFIX}{proxy}.{_mac(mesh_secret, proxy)}"


def _mac(mesh_secret: str, proxy: str) -> str:
    return hmac.new(mesh_secret.encode(), b"meshctl-proxy\0" + proxy.encode(), hashlib.sha256).hexdigest()


def bearer(credential: str) -> dict[str, str]:
    return {"authorization": f"Bearer {credential}"}


def _bearer_value(authorization: str | None) -> str:
    """The credential of an ``Authorization: Bearer`` header; Unauthenticated, saying why, otherwise."""
    if not authorization:
        raise Unauthenticated("no credential: send `Authorization: Bearer <credential>` (the mesh's is in "
                              f"<state-dir>/{AUTH_DIR}/{MESH_TOKEN_FILE})")
    scheme, _, value = authorization.strip().partition(" ")
    value = value.strip()
    if scheme.lower() != "bearer" or not value:
        raise Unauthenticated("the Authorization header must be `Bearer <credential>`")
    return value


def authenticate(authorization: str | None, mesh_secret: str) -> Caller:
    """The caller an ``Authorization`` header proves, or Unauthenticated."""
    value = _bearer_value(authorization)
    if hmac.compare_digest(value.encode(), mesh_secret.encode()):
        return Caller("mesh")
    if value.startswith(PROXY_PREFIX):
        name, _, mac = value[len(PROXY_PREFIX):].rpartition(".")
        if name and hmac.compare_digest(mac.encode(), _mac(mesh_secret, name).encode()):
            return Caller("proxy", name)
    raise Unauthenticated("credential not recognised: not this mesh's, nor one of its proxies'")


def mesh_verifier(mesh_secret: str) -> str:
    """What a proxy keeps to check the mesh credential on its admin API (``/config``, ``/mirror``, ``/traces``):
    its SHA-256, which cannot be turned back into the credential, so a proxy never
    holds what would let it act as the mesh."""
    return hashlib.sha256(b"meshctl-admin\0" + mesh_secret.encode()).hexdigest()


def check_mesh(authorization: str | None, verifier: str) -> None:
    """Unauthenticated unless ``authorization`` carries the mesh credential ``verifier`` was made from."""
    if not verifier:
        raise Unauthenticated("this proxy was started without the mesh's credential check (not under `meshctl up` "
                              "or `meshctl proxy run --state-dir`): its admin API keeps this to itself")
    value = _bearer_value(authorization)
    if not hmac.compare_digest(mesh_verifier(value).encode(), verifier.encode()):
        raise Unauthenticated("credential not recognised: not this mesh's")


# ---------------------------------------------------------------- the sidecar's bootstrap file


def write_bootstrap(state_dir: Path, name: str, entries: dict[str, str]) -> Path:
    """A one-time 0600 file with what a sidecar needs at start (Pilot credential,
    Citadel bootstrap token); its path goes to the sidecar in ENV_BOOTSTRAP."""
    import json

    path = Path(state_dir) / AUTH_DIR / BOOTSTRAP_DIR / f"{name}.{secrets.token_hex(6)}.json"
    write_private(path, json.dumps(entries))
    return path


def take_bootstrap(environ: "os._Environ[str] | dict[str, str] | None" = None) -> dict[str, str]:
    """Read and delete the bootstrap file named in ENV_BOOTSTRAP (empty when none)."""
    import json

    env = os.environ if environ is None else environ
    path = env.pop(ENV_BOOTSTRAP, "")
    if not path:
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}
