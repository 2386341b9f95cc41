"""``python -m meshctl.proxy --config FILE [--admin-port N]``: the lean sidecar process."""

import sys

from .main import main

sys.exit(main())
