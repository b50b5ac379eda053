"""What a sweep's compute target runs at once (tflaunch.sweep.slots, pure bookkeeping)."""
from __future__ import annotations

from tflaunch.sweep.slots import Pool


def test_trials_are_packed_onto_the_hosts_in_order():
    pool = Pool([["a", 4], ["b", 2]], per_host=2)
    assert pool.capacity() == 3
    taken = [pool.take() for _ in range(3)]
    assert [t["hosts"] for t in taken] == [[["a", 2]], [["a", 2]], [["b", 2]]]
    assert pool.take() is None
    pool.give(taken[1])
    assert pool.take()["hosts"] == [["a", 2]]


def test_multi_node_trials_take_distinct_hosts_and_exclusive_trials_whole_hosts():
    pool = Pool([["a", 2], ["b", 2], ["c", 2]], per_host=1, nodes=2)
    assert pool.take()["hosts"] == [["a", 1], ["b", 1]]
    assert pool.take()["hosts"] == [["a", 1], ["b", 1]]
    assert pool.take() is None  # two distinct hosts per trial: only c has room left
    exclusive = Pool([["a", 4], ["b", 4]], per_host=1, exclusive=True)
    first = exclusive.take()
    assert first["hosts"] == [["a", 4]] and exclusive.take()["hosts"] == [["b", 4]] and exclusive.take() is None


def test_local_gpus_are_shared_out_and_given_back():
    pool = Pool([["localhost", 8]], per_host=1, gpus=["0", "1", "2", "3"], gpu_need=2)
    assert pool.capacity() == 2
    a, b = pool.take(), pool.take()
    assert (a["gpus"], b["gpus"]) == (["0", "1"], ["2", "3"]) and pool.take() is None
    pool.give(a)
    assert pool.take()["gpus"] == ["0", "1"]
    resumed = Pool([["localhost", 8]], per_host=1, gpus=["0", "1", "2", "3"], gpu_need=2)
    resumed.hold(b)  # a trial adopted by a resumed driver keeps its GPUs
    assert resumed.take()["gpus"] == ["0", "1"] and resumed.take() is None


def test_a_trial_larger_than_the_machine_runs_alone_and_slurm_has_no_limit_here():
    pool = Pool([["localhost", 2]], per_host=8)
    assert pool.capacity() == 1 and pool.take() is not None and pool.take() is None
    assert Pool(None).capacity() is None and Pool(None).take() == {"hosts": None, "gpus": None}
