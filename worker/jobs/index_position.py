"""Where a page of a job index ends: ``{created ms}.{job id}``, the last job the page showed.

The indexes are sorted sets of job ids scored by creation time in ms; Redis orders the ids of one millisecond by
id, so a position names both and the next page starts right after that job, even among jobs created in the same
millisecond. A bare number (the cursors of earlier versions) names a millisecond: the next page starts below it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_POSITION = re.compile(r"^([0-9]{1,20})(?:\.(job_[0-9A-Za-z]{1,64}))?$")
# The text form, for an API's parameter pattern.
POSITION_PATTERN = _POSITION.pattern


@dataclass(frozen=True)
class IndexPosition:
    score: int
    job_id: str = ""

    @classmethod
    def parse(cls, text: str, field: str = "cursor") -> IndexPosition:
        """The position a cursor names; ValueError naming ``field`` for anything else."""
        match = _POSITION.match(text)
        if not match:
            raise ValueError(f"{field}: not a cursor of this index: {text!r}")
        return cls(int(match.group(1)), match.group(2) or "")

    def __str__(self) -> str:
        return f"{self.score}.{self.job_id}" if self.job_id else str(self.score)

    def precedes(self, score: int, job_id: str) -> bool:
        """Whether the job (``score``, ``job_id``) comes after this position, newest first."""
        return score < self.score or (score == self.score and job_id < self.job_id)
