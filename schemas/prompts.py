"""The prompt's identity: one hash of its token ids, the key the held-out split and rollouts group by.

Why a hash of the packed ids and not of the text: training reads token ids only (texts are for reviewers and
may be absent), and two requests with the same ids are the same prompt to the student whatever their text.
The ids are packed exactly as the store keeps them (`schemas.arrays.pack_ids`), so
`prompt_hash(ids) == sha256(trajectories.prompt_token_ids).hexdigest()`: a migration or a SQL job can compute
it from the stored column without this code.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from schemas.arrays import pack_ids


def prompt_hash(prompt_token_ids: Sequence[int]) -> str:
    """sha256 hex (64 characters) of the prompt's token ids packed as little-endian int32."""
    return hashlib.sha256(pack_ids(prompt_token_ids)).hexdigest()
