"""The proxy admin's /traces check: the mesh credential verified against a SHA-256 the proxy keeps."""

from __future__ import annotations

import pytest

from meshctl.credentials import Unauthenticated, check_mesh, mesh_verifier, proxy_credential


def test_only_the_mesh_credential_passes():
    secret = "mesh.abcdefghijklmnop"
    verifier = mesh_verifier(secret)
    assert secret not in verifier
    check_mesh(f"Bearer {secret}", verifier)
    check_mesh(f"bearer   {secret} ", verifier)
    for bad in (None, "", f"Basic {secret}", "Bearer ", "Bearer mesh.other", f"Bearer {proxy_credential(secret, 'p-0')}"):
        with pytest.raises(Unauthenticated):
            check_mesh(bad, verifier)
    with pytest.raises(Unauthenticated, match="without the mesh's credential check"):
        check_mesh(f"Bearer {secret}", "")  # a proxy started without a verifier keeps /traces to itself
