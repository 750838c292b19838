"""`appliance settings`: show every setting with its environment variable, type and default."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from appliance.config import ConfigError, load_settings, settings_table


def add_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "settings", help="show settings (defaults or effective)"
    )
    p.add_argument(
        "--effective", action="store_true", help="print the values this environment yields, as JSON"
    )
    p.add_argument("--config", type=Path, help="TOML settings file")
    p.add_argument("--markdown", action="store_true", help="print the defaults as a Markdown table")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.effective:
        try:
            settings = load_settings(config_file=args.config)
        except ConfigError as exc:
            print(f"appliance: configuration error: {exc}", file=sys.stderr)
            return 2
        print(json.dumps(settings.public_dict(), indent=2))
        return 0
    rows = settings_table()
    if args.markdown:
        print("| variable | type | default |\n|---|---|---|")
        for name, kind, default in rows:
            print(f"| `{name}` | {kind} | `{default}` |")
    else:
        width = max(len(r[0]) for r in rows)
        for name, kind, default in rows:
            print(f"{name:<{width}}  {default}  ({kind})")
    return 0
