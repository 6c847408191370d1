"""The gate's tunable limits, shared by the Feast engine config and the validate CLI."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Thresholds(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_error_share: float = Field(0.05, ge=0, le=1)
    """Most rows that may carry an annotation error (and so a null label)."""
    max_kl_divergence: float = Field(0.1, ge=0)
    """Largest KL(observed || reference) of an attribute's label distribution."""
    max_label_share_shift: float = Field(0.1, ge=0, le=1)
    """Multi-label attributes: largest change of a label's share of the labelled items
    (absolute, against the reference; 0.1 lets 30% move to 20% or 40%)."""
    min_rows_for_drift: int = Field(50, ge=1)
    """Smaller batches skip the drift check: their label shares are mostly noise."""
    caption_min_tokens: int = Field(1, ge=0)
    caption_max_tokens: int | None = Field(None, ge=1)
    """None: twice the spec's caption max_tokens (words and model tokens differ)."""
