"""Errors are values with codes. Services raise these; the HTTP layers turn them into
responses in one place each. Nothing here knows about HTTP."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass
class GovernanceError(Exception):
    message: str
    details: dict[str, Any] = field(default_factory=dict)
    code = "governance_error"

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class InvalidRequest(GovernanceError):
    code = "invalid_request"


class InvalidApiKey(GovernanceError):
    code = "invalid_api_key"


class SubscriptionInactive(GovernanceError):
    code = "subscription_inactive"


class AgentPaused(GovernanceError):
    code = "agent_paused"


class HoldNotFound(GovernanceError):
    code = "hold_not_found"


class ScopeNotFound(GovernanceError):
    """No such tenant, agent or budget, or one the caller may not see."""

    code = "not_found"


class HoldConflict(GovernanceError):
    """The hold is in a state that forbids the operation (capture after void, ...)."""

    code = "hold_conflict"


@dataclass
class BudgetExceeded(GovernanceError):
    """A budget refused: which scope, its spend and limit, and when its window resets."""

    scope_type: str = ""
    scope_key: str = ""
    spent_nanos: int = 0
    held_nanos: int = 0
    limit_nanos: int = 0
    resets_at: datetime | None = None
    state: str = ""  # the refusing period's (too little left is not always stopped)
    code = "budget_exceeded"
