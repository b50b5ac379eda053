"""Outputs from several hosts: lowest rank wins a conflict, the other copies are kept aside."""
from tflaunch.history.collect import merge_outputs


def _tree(root, files):
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_lowest_rank_wins_and_nothing_is_dropped(tmp_path):
    work = _tree(tmp_path / "work", {"outputs/model": "local rank 4", "outputs/local-only": "l"})
    h0 = _tree(tmp_path / "h0", {"outputs/model": "h0 rank 0", "outputs/sub/a": "h0", "logs/x.log": "h0"})
    h8 = _tree(tmp_path / "h8", {"outputs/model": "h8 rank 8", "outputs/sub/a": "h8", "outputs/h8-only": "8"})
    record = tmp_path / "record"
    warnings = merge_outputs(str(work), 4, "local", [("h8", 8, str(h8)), ("h0", 0, str(h0))], str(record))
    assert (work / "outputs/model").read_text() == "h0 rank 0"
    assert (work / "outputs/sub/a").read_text() == "h0"
    assert (work / "outputs/h8-only").read_text() == "8" and (work / "logs/x.log").read_text() == "h0"
    assert (record / "hosts/local/outputs/model").read_text() == "local rank 4"
    assert (record / "hosts/h8/outputs/model").read_text() == "h8 rank 8"
    assert (record / "hosts/h8/outputs/sub/a").read_text() == "h8"
    assert len(warnings) == 3 and all("lowest rank" in w for w in warnings)


def test_no_conflict_no_warning(tmp_path):
    work = _tree(tmp_path / "work", {"outputs/a": "a"})
    other = _tree(tmp_path / "o", {"outputs/b": "b"})
    assert merge_outputs(str(work), 0, "local", [("o", 1, str(other))], str(tmp_path / "r")) == []
    assert (work / "outputs/b").read_text() == "b"
