"""The sliding window never admits more than the limit in any window of length ``period``."""

from collections import deque

from hypothesis import given, settings, strategies as st
from twisted.internet.task import Clock

from stdaemon.ratelimit.sliding_window import (
    SampledCounter, SlidingWindow, SlidingWindowTable, decide, evaluate,
)


def _max_in_any_window(admitted, period):
    """Largest number of admitted timestamps in any half-open window [a, a + period)."""
    best = 0
    ordered = sorted(admitted)
    for i, t in enumerate(ordered):
        # windows ending at an admitted request: (t - period, t]
        n = sum(1 for s in ordered[: i + 1] if s > t - period)
        best = max(best, n)
    return best


steps = st.lists(
    st.tuples(
        st.floats(min_value=0, max_value=30, allow_nan=False, allow_infinity=False),
        st.sampled_from(["a", "b", "c"]),
        st.integers(min_value=1, max_value=4),
    ),
    min_size=1,
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(limit=st.integers(min_value=1, max_value=8),
       period=st.sampled_from([1.0, 7.5, 10.0, 60.0]),
       script=steps)
def test_no_window_admits_more_than_limit(limit, period, script):
    clock = Clock()
    table = SlidingWindowTable(max_keys=1000)
    admitted = {"a": [], "b": [], "c": []}
    for delta, key, burst in script:
        clock.advance(delta)
        for _ in range(burst):
            now = clock.seconds()
            state = table.hit(key, now, limit, period)
            # exactness: admitted iff fewer than `limit` admitted in (now - period, now]
            recent = sum(1 for s in admitted[key] if s > now - period)
            assert state.allowed == (recent < limit)
            if state.allowed:
                admitted[key].append(now)
            assert state.count == min(limit, recent + (1 if state.allowed else 0))
            assert 0 <= state.remaining <= limit
            if not state.allowed:
                assert state.retry_after > 0
    for key, times in admitted.items():
        assert _max_in_any_window(times, period) <= limit


def test_no_double_burst_across_a_fixed_window_boundary():
    # A fixed window would reset at t=60 and admit another 5 right away.
    clock = Clock()
    window = SlidingWindow()
    clock.advance(59)
    assert all(window.hit(clock.seconds(), 5, 60).allowed for _ in range(5))
    clock.advance(1.5)  # just across the boundary of a fixed minute
    assert not window.hit(clock.seconds(), 5, 60).allowed
    clock.advance(58.25)  # 118.75: the first five are still inside (58.75, 118.75]
    assert not window.hit(clock.seconds(), 5, 60).allowed
    clock.advance(0.25)  # 119.0: now they leave the window
    assert window.hit(clock.seconds(), 5, 60).allowed


def test_reset_and_retry_are_the_true_times():
    window = SlidingWindow()
    assert window.hit(100.0, 2, 60).reset_at == 160.0
    state = window.hit(110.0, 2, 60)
    assert (state.count, state.remaining, state.reset_at) == (2, 0, 160.0)
    denied = window.hit(120.0, 2, 60)
    assert not denied.allowed
    assert denied.retry_after == 40.0 and denied.retry_after_seconds == 40
    assert denied.reset_epoch == 160
    assert denied.usage() == {"count": 2, "limit": 2, "remaining": 0, "reset_in_seconds": 40.0}
    # denied requests leave no trace: at 160 one slot is free again
    assert window.hit(160.0, 2, 60).allowed


def test_peek_does_not_count():
    window = SlidingWindow()
    window.hit(0.0, 3, 10)
    assert window.peek(1.0, 3, 10).count == 1
    assert window.peek(1.0, 3, 10).count == 1
    assert window.peek(10.0, 3, 10).count == 0


def test_clock_stepping_back_keeps_order():
    ts = deque()
    decide(ts, 10.0, 5, 60)
    decide(ts, 5.0, 5, 60)
    assert list(ts) == [5.0, 10.0]
    assert evaluate(ts, 10.0, 5, 60, True).reset_at == 65.0


def test_limit_lowered_below_count_waits_for_enough_expiries():
    ts = deque([1.0, 2.0, 3.0, 4.0])
    state = decide(ts, 5.0, 2, 60)
    assert not state.allowed
    assert state.retry_at == 63.0  # two must leave: 1.0 and 2.0 (then 3.0, 4.0 remain)


def test_table_sweep_evicts_stale_keys_on_the_clock():
    clock = Clock()
    table = SlidingWindowTable()
    table.hit("old", clock.seconds(), 5, 10)
    clock.advance(5)
    table.hit("new", clock.seconds(), 5, 10)
    clock.advance(5)
    assert table.sweep(clock.seconds()) == 1
    assert "old" not in table and "new" in table
    clock.advance(5)
    table.sweep(clock.seconds())
    assert len(table) == 0


def test_table_caps_tracked_keys():
    table = SlidingWindowTable(max_keys=100)
    for i in range(10_000):
        table.hit(f"10.0.{i // 256}.{i % 256}", 1.0, 5, 60)
    assert len(table) == 100
    assert table.evicted == 9_900
    # the most recent keys are kept
    assert "10.0.39.15" in table


def test_sampler_records_once_per_key_interval_and_counts_the_rest():
    clock = Clock()
    sampler = SampledCounter(per_key_interval=60, global_limit=3, global_period=60)
    assert sampler.record("1.2.3.4", clock.seconds()) == (True, 0)
    for i in range(1, 50):
        assert sampler.record("1.2.3.4", clock.seconds()) == (False, i)
    clock.advance(60)
    assert sampler.record("1.2.3.4", clock.seconds()) == (True, 49)


def test_sampler_global_cap_holds_against_many_addresses():
    clock = Clock()
    sampler = SampledCounter(per_key_interval=60, global_limit=10, global_period=60, max_keys=50)
    recorded = sum(sampler.record(f"ip{i}", clock.seconds())[0] for i in range(10_000))
    assert recorded == 10
    assert len(sampler) == 50
    clock.advance(61)
    sampler.sweep(clock.seconds())
    assert len(sampler) == 0


def test_recent_keys_gauge_is_bounded_and_swept():
    from stdaemon.ratelimit.sliding_window import RecentKeys

    clock = Clock()
    recent = RecentKeys(horizon=60, max_keys=3)
    for ip in ["a", "b", "c", "d"]:
        recent.touch(ip, clock.seconds())
        clock.advance(10)
    assert len(recent) == 3  # "a" forgotten by the cap
    recent.touch("b", clock.seconds())  # seen again at 40
    clock.advance(55)  # 95: "c" (20) and "d" (30) are older than 60 s, "b" (40) is not
    assert recent.sweep(clock.seconds()) == 2
    assert len(recent) == 1
