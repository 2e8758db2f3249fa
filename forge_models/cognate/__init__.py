"""Phase 1 — Cognate: small decoder LMs with an ACT-halted recurrent refiner, trained from scratch.

``model`` defines and registers the architecture (imported eagerly by ``forge_models``); ``phase`` holds
``run`` / ``CognateInputs``. The phase is re-exported lazily so that registering the architecture never
pulls in the data pipeline and evaluation harness (and cannot create an import cycle with them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from forge_models.cognate.phase import CognateInputs, run

__all__ = ["CognateInputs", "run"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from forge_models.cognate import phase

        return getattr(phase, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
