"""The entry point of the one-file build (scripts/build-binary.sh, PyInstaller).

A frozen binary has no ``-m``: the supervisor starts the CLI as ``meshctl ARGS`` and
sidecars/gateways as ``meshctl __proxy__ ARGS``, which runs the lean proxy entry
point (meshctl/proxy/__main__.py) without importing the CLI; a sidecar fetches its
certificates with ``meshctl __citadel_fetch__`` (meshctl/citadel/fetch.py: JSON over
stdin/stdout). See meshctl.launch.
"""

import sys


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "__proxy__":
        from meshctl.proxy.main import main as proxy_main

        sys.exit(proxy_main(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "__citadel_fetch__":
        from meshctl.citadel.fetch import main as fetch_main

        sys.exit(fetch_main())
    from meshctl.cli.main import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
