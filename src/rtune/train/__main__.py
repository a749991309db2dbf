"""`python -m rtune.train MODEL DATA OUT [--config cpu] [--set lr=2e-4 ...] [--resume]`

The `rtune train` command is the friendly front end; this one takes any config field as
`--set FIELD=VALUE`, for scripts.
"""

import argparse
import logging
import sys

from rtune.errors import RtuneError
from rtune.train.config import load_config
from rtune.train.recipe import train


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rtune.train")
    p.add_argument("model")
    p.add_argument("data")
    p.add_argument("out")
    p.add_argument("--config", default=None, help="preset (paper, paper-qlora, cpu) or YAML file")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a config field")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    bad = [kv for kv in a.set if "=" not in kv]
    if bad:
        p.error(f"--set takes FIELD=VALUE, got {bad[0]!r}")
    try:
        config = load_config(a.config, dict(kv.split("=", 1) for kv in a.set))
        train(a.model, a.data, a.out, config, resume=a.resume, progress=not a.quiet)
    except RtuneError as e:
        print(f"rtune: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
