"""``twistd stdaemon``: command-line options and ``makeService``."""

from __future__ import annotations

import sys
from typing import Any, Optional

from twisted.python import usage

from stdaemon.config import load_config
from stdaemon.invalid import InvalidValue


class Options(usage.Options):
    synopsis = "[--config FILE] [--listen ENDPOINT ...] [--check-config]"
    longdesc = (
        "SimpleTuner's cloud-training operations server. With no config file it runs on "
        "embedded defaults: tcp:8080:interface=127.0.0.1, state under ~/.simpletuner "
        "(SIMPLETUNER_STATE_DIR)."
    )
    optParameters = [
        ["config", "c", None, "Configuration file (.yaml/.yml or .ini/.cfg)."],
    ]
    optFlags = [
        ["check-config", None, "Validate the configuration and exit."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self.loaded = None

    def opt_listen(self, endpoint: str) -> None:
        """Listen on this Twisted endpoint string (repeatable; replaces server.listen)."""
        self["listen"].append(endpoint)

    opt_l = opt_listen

    def postOptions(self) -> None:
        overrides = {"server.listen": list(self["listen"])} if self["listen"] else None
        try:
            self.loaded = load_config(self["config"], overrides=overrides)
        except InvalidValue as e:
            raise usage.UsageError(f"configuration error: {e}") from None
        for warning in self.loaded.warnings:
            print(f"stdaemon: warning: {warning}", file=sys.stderr)
        if self["check-config"]:
            print(f"stdaemon: configuration OK ({self['config'] or 'embedded defaults'})")
            raise SystemExit(0)


def makeService(options: Options, reactor: Optional[Any] = None) -> Any:
    from stdaemon.service import make_service

    if options.loaded is None:
        options.postOptions()
    return make_service(options.loaded.config, reactor=reactor)
