"""Placeholder until the live-streams module lands: adds nothing."""

from __future__ import annotations

from aiohttp import web


def setup_streams(app: web.Application) -> None:
    return None
