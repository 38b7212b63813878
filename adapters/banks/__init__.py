"""Bank kinds by name. A method lists the kinds it writes; the pool allocates them."""

from __future__ import annotations

from adapters.banks.base import Bank
from adapters.banks.lowrank import LowRankBank
from adapters.banks.rowscale import RowScaleBank

BANKS: dict[str, type[Bank]] = {cls.kind: cls for cls in (LowRankBank, RowScaleBank)}

__all__ = ["BANKS", "Bank"]
