"""The rollout journal: fetched batches on disk before use, consumed by checkpoints group by group, replayed after
a restart in fetch order (none twice), pruned once every kept checkpoint has them, and never a half-written
entry."""

import logging
import os

import pytest
from support.run_fakes import batch, tags

from paraloop.run.fetcher import _journal
from paraloop.run.journal import Consumed, Journal


def test_consumed_compacts_finished_entries_and_round_trips_through_json():
    consumed = Consumed()
    consumed.add([(0, 1, 2), (1, 0, 1), (2, 0, 3)])
    assert consumed.below == 0 and not consumed.entry_done(0) and consumed.entry_done(1)
    consumed.add([(0, 0, 2)])  # entry 0 done, and 1 was: both fold into `below`
    assert consumed.below == 2 and consumed.partial == {2: (3, {0})}
    assert consumed.has(0, 1) and consumed.has(2, 0) and not consumed.has(2, 1)
    again = Consumed.from_json(consumed.to_json())
    assert again == consumed
    with pytest.raises(ValueError):
        Consumed.from_json({"below": -1})
    with pytest.raises(ValueError):
        Consumed.from_json("not a state")


def test_entries_replay_what_a_checkpoint_has_not_consumed_in_fetch_order(tmp_path):
    journal = Journal(tmp_path)
    for tag in (1, 3, 5):
        journal.append(batch(tag, tag + 1, source_state={"atropos_step": tag}))
    consumed = Consumed()
    consumed.add([(0, 0, 2), (0, 1, 2), (1, 1, 2)])  # entry 0 whole, entry 1's second group
    replay = Journal(tmp_path).unconsumed(consumed)  # a new process reads what the old one wrote
    assert [(r.seq, r.indices) for r in replay] == [(1, [0]), (2, [0, 1])]
    assert tags(replay[0].batch) == [3, 4] and replay[1].batch.source_state == {"atropos_step": 5}
    assert Journal(tmp_path).next_seq == 3, "numbering goes on after a restart"


def test_prune_deletes_only_entries_every_kept_checkpoint_has_consumed(tmp_path):
    journal = Journal(tmp_path)
    for tag in range(4):
        journal.append(batch(tag))
    older, newer = Consumed(), Consumed()
    older.add([(0, 0, 1)])
    newer.add([(0, 0, 1), (1, 0, 1), (2, 0, 1)])
    assert journal.prune([older, newer]) == 1
    assert journal.entries() == [1, 2, 3]
    assert journal.prune([newer]) == 2 and journal.entries() == [3]
    assert journal.prune([]) == 0, "no checkpoint yet: nothing may go"
    assert journal.stats()["entries"] == 1 and journal.stats()["pruned"] == 3


def test_a_write_that_died_half_way_is_never_an_entry(tmp_path):
    journal = Journal(tmp_path)
    journal.append(batch(1))
    dead = journal.dir / f".tmp-{1:012d}-999999999"  # a pid that does not exist
    dead.write_bytes(b"\x82partial")
    assert Journal(tmp_path).entries() == [0] and not dead.exists()


def test_a_damaged_entry_is_reported_and_skipped(tmp_path, caplog):
    journal = Journal(tmp_path)
    journal.append(batch(1))
    journal.append(batch(2))
    journal.path(0).write_bytes(b"\xc1 not msgpack")
    with caplog.at_level(logging.ERROR, logger="paraloop.journal"):
        replay = journal.unconsumed(Consumed())
    assert [r.seq for r in replay] == [1]
    assert any("cannot be read" in r.getMessage() for r in caplog.records)


def test_a_batch_the_journal_cannot_take_is_still_trained_and_the_failure_shows(tmp_path, monkeypatch, caplog):
    """Disk full, injected at the write (a chmod'ed directory does not stop root): no entry, no temporary file
    left, and the fetcher goes on with the batch (it is only not safe from a crash)."""
    import anyio

    journal = Journal(tmp_path)
    real_fsync = os.fsync

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with caplog.at_level(logging.ERROR, logger="paraloop.fetcher"):
        seq = anyio.run(_journal, journal, batch(1))
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert seq is None and journal.entries() == [] and list(journal.dir.iterdir()) == []
    assert journal.stats()["errors"] == 1 and "No space left" in journal.stats()["last_error"]
    assert any("training it anyway" in r.getMessage() for r in caplog.records)
    assert anyio.run(_journal, journal, batch(2)) == 0 and journal.stats()["last_error"] is None


def test_a_resumed_run_in_another_directory_brings_the_unconsumed_entries(tmp_path):
    old = Journal(tmp_path / "old")
    for tag in (1, 2, 3):
        old.append(batch(tag))
    consumed = Consumed()
    consumed.add([(0, 0, 1)])
    new = Journal(tmp_path / "new")
    assert new.adopt(old, consumed) == 2
    assert [r.seq for r in new.unconsumed(consumed)] == [1, 2] and new.next_seq == 3
    assert new.adopt(Journal(tmp_path / "new"), consumed) == 0, "its own directory: nothing to copy"
