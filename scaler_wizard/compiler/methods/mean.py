"""`mean`: new vocabulary rows (embedding, LM head, its bias) are the mean of the old rows. Approx by
design: the new head rows add terms to the softmax denominator; ``verify`` reports the drift on
the old vocabulary. Source: the common new-token init (Hewitt, 2021, "Initializing new word
embeddings for pretrained language models")."""

from __future__ import annotations

from dataclasses import dataclass

from scaler_wizard.compiler.methods.base import register
from scaler_wizard.compiler.methods.width import WidthMethod
from scaler_wizard.compiler.resolved import APPROX


@register
@dataclass(frozen=True)
class Mean(WidthMethod):
    name = "mean"
    groups = ("vocab",)
    base = APPROX
    copies = False
    summary = "new embedding / LM-head rows set to the mean row"
    source = "Hewitt (2021), Initializing new word embeddings for pretrained language models"

    def exactness(self, cx):
        return APPROX, "new token rows change the softmax denominator"
