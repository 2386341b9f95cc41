"""`meshctl citadel serve` as a real process: a sidecar bootstraps with a token and renews."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from meshctl.citadel.errors import TokenReused
from meshctl.citadel.server import CertificateSource
from meshctl.cli.citadel import app  # noqa: F401  (the command under test must import)
from meshctl.proxy.tls import CertificateHolder

pytestmark = pytest.mark.e2e

SERVE = "from meshctl.cli.citadel import app; app()"


@pytest.fixture
def citadel_process(tmp_path):
    sd = tmp_path / ".meshctl"
    subprocess.run([sys.executable, "-c", SERVE, "init", "--state-dir", str(sd)], check=True, capture_output=True)
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE, "serve", "--port", "0", "--cert-ttl", "1h", "--state-dir", str(sd)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60  # a process start-up: generous for a loaded machine
        url = None
        while url is None:
            if proc.poll() is not None:
                raise AssertionError(f"citadel serve exited: {proc.stdout.read().decode()}")
            if time.monotonic() > deadline:
                raise AssertionError("citadel serve did not publish its address in control.json")
            try:
                url = json.loads((sd / "control.json").read_text()).get("citadel")
            except (FileNotFoundError, json.JSONDecodeError):
                pass
            time.sleep(0.05)
        yield url, sd
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _token(sd, identity):
    out = subprocess.run(
        [sys.executable, "-c", SERVE, "token", identity, "--state-dir", str(sd)], check=True, capture_output=True
    )
    return out.stdout.decode().strip()


async def test_sidecar_bootstraps_and_renews_against_a_citadel_process(citadel_process):
    url, sd = citadel_process
    tok = _token(sd, "default/reviews")  # issued by another process than the server
    src = CertificateSource(url, tok)
    holder = CertificateHolder()
    holder.update(*await src.obtain())
    assert holder.identity == "spiffe://cluster.local/ns/default/sa/reviews"
    life = holder.not_after - holder.not_before
    assert 3600 <= life.total_seconds() <= 3660  # --cert-ttl 1h, plus the 60 s backdating
    holder.update(*await src.obtain())  # renewal
    assert holder.generation == 2
    with pytest.raises(TokenReused):
        await CertificateSource(url, tok).obtain()
    status = subprocess.run(
        [sys.executable, "-c", SERVE, "status", "--json", "--state-dir", str(sd)], check=True, capture_output=True
    )
    ids = json.loads(status.stdout)["identities"]
    assert [(i["spiffe_id"], i["how"]) for i in ids] == [("spiffe://cluster.local/ns/default/sa/reviews", "renewal")]
