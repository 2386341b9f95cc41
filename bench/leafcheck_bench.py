"""Cost of the SPIFFE check on a peer's certificate, per mTLS handshake.

After OpenSSL's handshake a sidecar checks the peer's leaf (proxy/tls.py
``_handshake``). Three ways, on the DER of a certificate Citadel's CA signs,
interleaved (A B C A B C ...), median of rounds:

  cryptography    citadel.identity.check_leaf: parse with `cryptography`, the rules
                  (what sidecars ran before; Citadel and the gateway still do)
  der, first      citadel.leaf.check_peer_der on a certificate not seen before:
                  the DER reader, the rules
  der, again      the same certificate again (a peer reconnecting): kept facts, the rules

and, for scale, one full mutual-TLS handshake (both sides, memory BIOs, P-256,
TLS 1.3) with the same certificates. Ends with one JSON line.

    flock /tmp/bench.lock .venv/bin/python bench/leafcheck_bench.py [--rounds 30]
"""

from __future__ import annotations

import argparse
import json
import ssl
import statistics
import time
from datetime import datetime, timedelta, timezone

from meshctl.citadel import leaf
from meshctl.citadel.ca import create_root, generate_key, key_to_pem, make_csr
from meshctl.citadel.identity import check_leaf
from meshctl.proxy.tls import client_context, server_context

ID = "spiffe://cluster.local/ns/default/sa/reviews"


def _per_call(fn, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e6


def _handshake(sctx: ssl.SSLContext, cctx: ssl.SSLContext) -> None:
    bufs = [ssl.MemoryBIO() for _ in range(4)]
    s = sctx.wrap_bio(bufs[0], bufs[1], server_side=True)
    c = cctx.wrap_bio(bufs[2], bufs[3], server_side=False)
    done = [False, False]
    while not all(done):
        for i, (obj, out, peer_in) in enumerate(((c, bufs[3], bufs[0]), (s, bufs[1], bufs[2]))):
            if not done[i]:
                try:
                    obj.do_handshake()
                    done[i] = True
                except ssl.SSLWantReadError:
                    pass
            data = out.read()
            if data:
                peer_in.write(data)
    c.getpeercert(binary_form=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()
    now = datetime.now(timezone.utc)
    root = create_root("cluster.local", now - timedelta(days=1))
    certs = []
    for _ in range(2000):  # distinct certificates for the "first" case
        certs.append(root.sign_csr(make_csr(generate_key()), ID, timedelta(hours=1), now))
    ders = [leaf.pem_to_der(p)[0] for p in certs]
    key = generate_key()
    chain = root.sign_csr(make_csr(key), ID, timedelta(hours=1), now)
    sctx = server_context(chain, key_to_pem(key), root.root_pem)
    cctx = client_context(chain, key_to_pem(key), root.root_pem)
    expect = frozenset({ID})
    der = ders[0]
    results: dict[str, list[float]] = {"cryptography": [], "der_first": [], "der_again": [], "handshake": []}
    per_round = len(ders) // args.rounds or 1
    for r in range(args.rounds):
        results["cryptography"].append(_per_call(
            lambda: check_leaf(der, expect, now, usage="server", trust_domain="cluster.local"), 200))
        batch = iter(ders[r * per_round:(r + 1) * per_round] or ders[:per_round])
        leaf._seen.clear()
        results["der_first"].append(_per_call(
            lambda: leaf.check_peer_der(next(batch), expect, now, usage="server", trust_domain="cluster.local"),
            per_round))
        results["der_again"].append(_per_call(
            lambda: leaf.check_peer_der(der, expect, now, usage="server", trust_domain="cluster.local"), 200))
        results["handshake"].append(_per_call(lambda: _handshake(sctx, cctx), 5))
    med = {k: round(statistics.median(v), 1) for k, v in results.items()}
    for k, v in med.items():
        print(f"{k:<14}{v:>10.1f} µs")
    print(json.dumps({"bench": "leafcheck", "us": med,
                      "ratio_der_first": round(med["der_first"] / med["cryptography"], 2),
                      "ratio_der_again": round(med["der_again"] / med["cryptography"], 2)}))


if __name__ == "__main__":
    main()
