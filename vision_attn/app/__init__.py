"""``vision-attn app``: an attention explorer in the browser (a Gradio app), and its engine without the browser.

:class:`Explorer` (no Gradio needed) opens a model and computes what the page shows, through the same library as
``vision-attn explain``; :func:`build_app` / :func:`launch_app` (the ``app`` extra: ``pip install
'vision_attn[app]'``) put it in a page with an API for ``gradio_client``. See ``docs/app.md``.
"""

from __future__ import annotations

from typing import Any

from vision_attn.app.explorer import Explorer, Subject, TokenMaps

__all__ = ["Explorer", "Subject", "TokenMaps", "build_app", "launch_app"]


def __getattr__(name: str) -> Any:
    if name in ("build_app", "launch_app"):  # imports gradio: only when asked for
        from vision_attn.app import server

        return getattr(server, name)
    raise AttributeError(f"module 'vision_attn.app' has no attribute {name!r}")
