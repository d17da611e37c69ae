"""One progress bar for every long loop (training steps, evaluated items), so all of them look and switch off alike."""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "item", initial: int = 0) -> Any:
    """A tqdm bar over ``total`` units starting at ``initial``; ``enabled=False`` gives a silent bar with the same API."""
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True)
