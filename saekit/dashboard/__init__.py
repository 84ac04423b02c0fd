"""`saekit dashboard`: a static, self-contained HTML browser of an SAE's atoms on a
vision-language model.

    OUT/index.html                 summary and the list of index pages
    OUT/index_00000.html ...       one table row per atom (atoms_per_index per page)
    OUT/atoms/block_00000.html ... atoms_per_page atoms per page: top-activating examples
                                   (image with the atom's patch activations drawn over it,
                                   text tokens highlighted), activation histogram, image vs
                                   text share, tokens its decoder direction promotes
    OUT/dashboard.json             what was built (d_sae, atoms_per_page, SAE, data)

Pages link to each other with relative paths and hold their images inline (base64 PNG),
so the folder can be copied or served as it is. `atom_link` gives another tool (the
SegCompass report) the page of an atom.
"""

from __future__ import annotations

import json
from pathlib import Path

DASHBOARD_FILE = "dashboard.json"
DASHBOARD_FORMAT = "saekit-dashboard"
ATOM_DIR = "atoms"


def atom_href(atom: int, atoms_per_page: int) -> str:
    """Path of `atom`'s section relative to the dashboard folder."""
    return f"{ATOM_DIR}/block_{atom // atoms_per_page:05d}.html#atom-{atom}"


def atom_link(dashboard: str | Path, atom: int) -> Path | None:
    """The page (with #anchor) of `atom` in the dashboard folder `dashboard`, or None when
    the folder holds no dashboard or the atom is outside it."""
    record_path = Path(dashboard) / DASHBOARD_FILE
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return None
    if record.get("format") != DASHBOARD_FORMAT or not 0 <= atom < int(record.get("d_sae", 0)):
        return None
    return Path(dashboard) / atom_href(atom, int(record["atoms_per_page"]))
