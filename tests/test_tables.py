"""The one markdown table renderer."""

import pytest

from fastprune.tables import markdown_table, width_cells


def test_markdown_table_cells_and_alignment():
    text = markdown_table(("layer", "heads"), [(0, 4), ("1", "removed")], align="lr")
    assert text.splitlines() == ["| layer | heads |", "|---|---:|", "| 0 | 4 |", "| 1 | removed |"]
    assert markdown_table(("a", "b"), []) == "| a | b |\n|---|---|"
    with pytest.raises(ValueError, match="2 letters for 3 columns"):
        markdown_table(("a", "b", "c"), [], align="lr")


def test_width_cells_mark_missing_counts():
    assert width_cells({"heads": 6, "intermediate": 40, "shared_intermediate": 8}) == (6, "-", 40)
    assert width_cells(None) == ("-", "-", "-")
