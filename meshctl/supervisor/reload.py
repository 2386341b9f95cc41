"""What `meshctl up` on a running mesh does with a changed mesh.yaml ``settings`` block. Pure.

Every field of MeshSettings is in exactly one of these lists (a unit test holds
them to it), so a new setting cannot be accepted by a reload and ignored:

    setting                        | on a running mesh
    -------------------------------+------------------------------------------------------------
    registry, trustDomain,         | refused by name: the control plane, the CA, every identity
    namespace, stateDir,           |   and every address were made from them; `meshctl down`,
    pilotPort, portRange, meshId   |   then `up` again (meshId: where Pilot reads the rules)
    readyTimeout                   | the supervisor uses the new value at once
    pathNormalization, upgradeTypes| every sidecar and gateway is started again with it (its
    requestTimeout, maxConnections,|   node file), out of the endpoints while it restarts, in two
    drainDuration,                 |   parallel waves: all but one instance of each service
    outboundTrafficPolicy,         |   version, then those (workloads.restart_sidecars); a
    extensionProviders, tracing,   |   sidecar stops once the other proxies run a config
    outboundUsers                  |   without it (at most 5 s); apps keep running
    locality, advertise            | the same for gateways; each workload instance is started
                                   |   again (its plan changed), registered with its new locality
                                   |   or at its new address
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..loader.codec import camel
from ..model.mesh import MeshSettings

REFUSED = ("registry", "trust_domain", "namespace", "state_dir", "pilot_port", "port_range", "mesh_id")
SUPERVISOR = ("ready_timeout",)
PROXIES = ("path_normalization", "upgrade_types", "request_timeout", "max_connections", "drain_duration",
           "outbound_traffic_policy", "extension_providers", "tracing", "locality",
           "advertise", "outbound_users")


@dataclass(frozen=True)
class SettingsChange:
    refused: tuple[str, ...] = ()  # as mesh.yaml names them: settings.trustDomain, ...
    supervisor: tuple[str, ...] = ()
    proxies: tuple[str, ...] = ()

    def refusal(self) -> str:
        """The message `up` fails with when ``refused`` is not empty."""
        which = ", ".join(self.refused)
        return (f"{which} changed in mesh.yaml: a running mesh keeps {'it' if len(self.refused) == 1 else 'them'} "
                "(the control plane, certificates and addresses were made from it); `meshctl down`, then `up` again")


def settings_change(old: MeshSettings, new: MeshSettings) -> SettingsChange:
    """The settings that differ between ``old`` and ``new``, by what a reload does with them."""
    changed = [f.name for f in fields(MeshSettings) if getattr(old, f.name) != getattr(new, f.name)]

    def named(group: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(f"settings.{camel(n)}" for n in changed if n in group)

    unknown = tuple(f"settings.{camel(n)}" for n in changed if n not in REFUSED + SUPERVISOR + PROXIES)
    return SettingsChange(refused=named(REFUSED) + unknown, supervisor=named(SUPERVISOR), proxies=named(PROXIES))
