"""Content keys: one hash for every cache key and fingerprint.

A key is a stable function of JSON-able content (dict key order does not
matter; non-JSON values hash by ``str``). Feature keys, dataset
fingerprints, similarity keys, trial fingerprints and the report's spec
fingerprint all come from :func:`content_key`, each with its own length.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def content_key(content: Any, length: int = 24) -> str:
    """The first ``length`` hex digits of sha256 over canonical JSON of ``content``."""
    blob = json.dumps(content, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]
