"""ResumableSampler / ResumableIterable: rank split, exact resume (also across epochs and through a DataLoader)."""
import pytest
import torch

from qwen3_scratch.data.sampler import ResumableIterable, ResumableSampler

N, BS, EPOCHS = 37, 3, 3


def run(sampler, stop_after=None, n_epochs=EPOCHS):
    "Toy training loop over a DataLoader(num_workers=0); returns trained-on samples and the state at the stop."
    loader = torch.utils.data.DataLoader(list(range(1000, 1000 + N)), batch_size=BS, sampler=sampler, num_workers=0)
    seen, steps = [], 0
    for epoch in range(sampler.epoch, n_epochs):
        sampler.set_epoch(epoch)
        for batch in loader:
            seen += batch.tolist(); sampler.advance(len(batch)); steps += 1
            if steps == stop_after: return seen, sampler.state_dict()
    return seen, sampler.state_dict()


@pytest.mark.parametrize("world_size", [1, 4])
@pytest.mark.parametrize("drop_last", [True, False])
def test_resume_exact(world_size, drop_last):
    for rank in range(world_size):
        mk = lambda: ResumableSampler(N, rank, world_size, seed=11, drop_last=drop_last)
        full, _ = run(mk())
        per_epoch = -(-mk().num_samples // BS)
        assert len(full) == EPOCHS * mk().num_samples
        # stops mid-epoch, exactly at an epoch end, just after one, and a resume of a resume
        for stops in ([2], [per_epoch], [per_epoch + 1], [1, per_epoch, 2]):
            s, got = mk(), []
            for stop in stops:
                part, state = run(s, stop_after=stop); got += part
                s = mk(); s.load_state_dict(state)
            rest, _ = run(s)
            assert got + rest == full, (rank, stops)


@pytest.mark.parametrize("world_size", [1, 2, 4, 5])
def test_ranks_disjoint_and_covering(world_size):
    for drop_last in (True, False):
        for epoch in (0, 1):
            parts = []
            for r in range(world_size):
                s = ResumableSampler(N, r, world_size, seed=2, drop_last=drop_last); s.set_epoch(epoch)
                parts.append(list(s))
            assert len({len(p) for p in parts}) == 1
            flat = sum(parts, [])
            if drop_last:
                assert len(flat) == len(set(flat)) == N // world_size * world_size
            else:
                assert set(flat) == set(range(N)) and len(flat) == -(-N // world_size) * world_size


def test_epochs_shuffle_and_seed():
    a, b = ResumableSampler(N, seed=1), ResumableSampler(N, seed=1)
    assert list(a) == list(b) and sorted(a) == list(range(N))
    e0 = list(a); a.set_epoch(1)
    assert list(a) != e0 and list(ResumableSampler(N, seed=2)) != e0
    assert list(ResumableSampler(N, shuffle=False)) == list(range(N))


def test_len_and_errors():
    s = ResumableSampler(N, 0, 4)
    assert len(s) == 9
    s.advance(4); assert len(s) == 5 and len(list(s)) == 5
    with pytest.raises(ValueError, match="set_epoch"): s.advance(6)
    with pytest.raises(ValueError, match="world_size"): ResumableSampler(N, 0, 2).load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="rank"): ResumableSampler(N, 4, 4)
    with pytest.raises(ValueError, match="drop_last"): ResumableSampler(3, 0, 4)
    assert len(ResumableSampler(torch.utils.data.TensorDataset(torch.zeros(10)), 0, 3)) == 3


@pytest.mark.parametrize("world_size", [1, 4])
def test_iterable_resume(world_size):
    stream = lambda epoch: iter(range(epoch * 1000, epoch * 1000 + N))
    full = [list(ResumableIterable(stream, r, world_size)) for r in range(world_size)]
    assert sorted(sum(full, [])) == list(range(N))
    for r in range(world_size):
        for stop in (1, 3, len(full[r])):
            it = ResumableIterable(stream, r, world_size)
            loader = torch.utils.data.DataLoader(it, batch_size=1, num_workers=0)
            seen = []
            for b in loader:
                seen += b.tolist(); it.advance(1)
                if len(seen) == stop: break
            again = ResumableIterable(stream, r, world_size); again.load_state_dict(it.state_dict())
            assert seen + list(again) == full[r]
            again.set_epoch(1)
            assert list(again) == [x + 1000 for x in full[r]]


def test_iterable_rejects_many_workers(monkeypatch):
    # as seen inside a DataLoader worker of 2 (a real 2-worker loader costs ~10 s of worker shutdown)
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: type("W", (), {"num_workers": 2})())
    with pytest.raises(RuntimeError, match="num_workers"): list(ResumableIterable(lambda: range(10)))
