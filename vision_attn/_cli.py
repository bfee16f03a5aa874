"""Argument parsing shared by the command-line tools (``vision-attn explain``, ``vision-attn export``)."""

from __future__ import annotations

import json
from typing import Any


def json_object_option(text: str, option: str) -> dict[str, Any]:
    """The JSON object given to ``option`` (e.g. ``--model-args``) as a dict; a ``ValueError`` naming the option and
    the value otherwise."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{option} {text!r} is not JSON: {err}") from err
    if not isinstance(value, dict):
        raise ValueError(
            f"{option} must be a JSON object of keyword arguments such as '{{\"num_classes\": 10}}', got {text}"
        )
    return value
