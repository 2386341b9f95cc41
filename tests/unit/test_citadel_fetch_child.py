"""The certificate fetch child (citadel/fetch.py), run as trio runs it (trio.run_process) and as a
sidecar on evloop runs it (subprocess.run from evloop's worker thread): the same answer either way."""

import pytest
import trio

from meshctl.citadel.errors import CitadelError
from meshctl.citadel.fetch import ChildCertificateSource
from meshctl.proxy import evloop
from tests.tools.servers import free_port


@pytest.mark.parametrize("runtime", ["trio", "evloop"])
def test_an_unreachable_citadel_is_a_citadel_error_naming_it(runtime):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    in_thread = evloop.run_sync_in_thread if runtime == "evloop" else None
    source = ChildCertificateSource(url, "token", timeout=5.0, in_thread=in_thread)

    async def obtain() -> BaseException | None:
        try:
            await source.obtain()
        except CitadelError as exc:
            return exc
        return None

    exc = (evloop.run if runtime == "evloop" else trio.run)(obtain)
    assert isinstance(exc, CitadelError)
    assert url.split("//")[1] in str(exc) or "127.0.0.1" in str(exc), str(exc)
    assert "fetch process" not in str(exc)  # the child answered: it is Citadel's failure, not the child's
