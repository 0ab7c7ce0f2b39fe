"""Start-up rules that tie settings together."""

import pytest

from floe.config import BatchSettings, ServerSettings, Settings
from floe.errors import ConfigError
from floe.resolve import fit_max_length


def test_max_length_within_budget_is_kept():
    s = Settings(batch=BatchSettings(max_batch_tokens=16384))
    assert fit_max_length(s, 2048) is s


def test_max_length_over_budget_is_lowered_with_auto_truncate():
    s = Settings(batch=BatchSettings(max_batch_tokens=16384))
    assert fit_max_length(s, 32768).model.max_seq_length == 16384


def test_max_length_over_budget_refused_without_auto_truncate():
    s = Settings(batch=BatchSettings(max_batch_tokens=1024), server=ServerSettings(auto_truncate=False))
    with pytest.raises(ConfigError, match="max-batch-tokens"):
        fit_max_length(s, 2048)
