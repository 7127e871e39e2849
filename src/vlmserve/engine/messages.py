"""The messages that cross the pipes between an `EngineProcess` and its child: typed, plain data.

Parent -> child: `AddRequest`, `AbortRequest`, `Stop`. Child -> parent: `Ready` or `LoadFailed` once, then
one `StepReport` per loop turn. Each side pickles them (engine_process.dumps: CPU tensors as numpy buffers);
nothing else crosses.

Does not know: how the pipes are read or written, the engine's internals.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vlmserve.engine.inputs import EngineRequest
from vlmserve.engine.outputs import CompletionDelta

# --- parent -> child ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AddRequest:
    request: EngineRequest


@dataclass(frozen=True)
class AbortRequest:
    request_id: str


@dataclass(frozen=True)
class Stop:
    pass


Command = AddRequest | AbortRequest | Stop

# --- child -> parent ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ready:
    stats: dict[str, float]


@dataclass(frozen=True)
class LoadFailed:
    error: BaseException


@dataclass
class StepReport:
    """What the child sends after one loop turn: which adds were accepted or refused (with the exception),
    the step's deltas (if it stepped), the engine stats after it, and why the engine died (last report)."""

    accepted: list[str] = field(default_factory=list)
    refused: list[tuple[str, BaseException]] = field(default_factory=list)
    stepped: bool = False
    deltas: list[CompletionDelta] = field(default_factory=list)
    stats: dict[str, float] | None = None
    dead_reason: str | None = None
