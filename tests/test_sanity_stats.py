"""The black-box-vs-white-box sanity check needs evidence: a failure only when black-box
attacks fooled more than 5% of the white-box survivors with 95% confidence."""

from __future__ import annotations

from advguard.evaluate.sanity import black_box_status


def test_black_box_status_needs_evidence():
    assert black_box_status([(0, 76), (0, 1)]) == "pass"
    assert black_box_status([(0, 76), (1, 1)]) == "warn"  # one survivor at one epsilon
    assert black_box_status([(2, 2)]) == "fail"  # lower bound 0.22
    assert black_box_status([(1, 100)]) == "warn"
    assert black_box_status([(12, 100)]) == "fail"  # lower bound 0.07
    assert black_box_status([(8, 100)]) == "warn"  # lower bound 0.04
    assert black_box_status([(8, 100)], share=0.01) == "fail"
