"""The gitignore subset used for snapshots."""
import pytest

from tflaunch.history.ignore import is_ignored, parse_rules

RULES = parse_rules("""
# comment
*.log
!keep.log
build/
/top.txt
docs/**/*.md
**/tmp
cache/**
\\#hash
\\!bang
data/[0-9]?.bin
trailing.txt   
""")


@pytest.mark.parametrize("path, is_dir, expected", [
    ("x.log", False, True), ("a/b/x.log", False, True), ("a/keep.log", False, False),
    ("build", True, True), ("build", False, False), ("a/build", True, True),
    ("top.txt", False, True), ("a/top.txt", False, False),
    ("docs/x.md", False, True), ("docs/a/b/x.md", False, True), ("other/x.md", False, False),
    ("tmp", True, True), ("a/b/tmp", False, True),
    ("cache/x", False, True), ("cache", True, False),
    ("#hash", False, True), ("!bang", False, True),
    ("data/12.bin", False, True), ("data/a2.bin", False, False), ("data/1.bin", False, False),
    ("trailing.txt", False, True), ("train.py", False, False),
])
def test_patterns(path, is_dir, expected):
    assert is_ignored(path, is_dir, RULES) is expected


def test_rules_of_a_subdirectory_apply_below_it_only():
    rules = parse_rules("/local.txt\n*.tmp\n", base="sub")
    assert is_ignored("sub/local.txt", False, rules)
    assert not is_ignored("sub/x/local.txt", False, rules)
    assert is_ignored("sub/x/y.tmp", False, rules)
    assert not is_ignored("y.tmp", False, rules)
    assert not is_ignored("other/local.txt", False, rules)


def test_last_match_wins():
    rules = parse_rules("!a.txt\n*.txt\n")
    assert is_ignored("a.txt", False, rules)
