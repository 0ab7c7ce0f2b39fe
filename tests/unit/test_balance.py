import collections
import random

import pytest

from floe.fleet.balance import Balancer, ReplicaLoad


def loads(n, unhealthy=(), tokens=None):
    tokens = tokens or [0] * n
    return [ReplicaLoad(i, i not in unhealthy, tokens[i], 0) for i in range(n)]


def test_round_robin_cycles_in_order():
    b = Balancer("round_robin")
    picks = [b.pick(loads(3)) for _ in range(7)]
    assert picks == [0, 1, 2, 0, 1, 2, 0]


def test_round_robin_skips_unhealthy_and_keeps_order_when_one_rejoins():
    b = Balancer("round_robin")
    assert [b.pick(loads(3, unhealthy={1})) for _ in range(3)] == [0, 2, 0]
    # replica 1 back: the cursor is after 0, so 1 comes next
    assert [b.pick(loads(3)) for _ in range(3)] == [1, 2, 0]


def test_random_is_uniform_over_healthy():
    b = Balancer("random", rng=random.Random(7))
    counts = collections.Counter(b.pick(loads(4, unhealthy={2})) for _ in range(6000))
    assert set(counts) == {0, 1, 3}
    for i in (0, 1, 3):
        assert 1800 < counts[i] < 2200, counts


def test_random_is_reproducible_with_injected_rng():
    a = Balancer("random", rng=random.Random(3))
    b = Balancer("random", rng=random.Random(3))
    assert [a.pick(loads(5)) for _ in range(50)] == [b.pick(loads(5)) for _ in range(50)]


def test_least_loaded_picks_fewest_tokens():
    b = Balancer("least_loaded")
    for _ in range(10):
        assert b.pick(loads(3, tokens=[500, 20, 300])) == 1


def test_least_loaded_counts_tokens_not_requests():
    b = Balancer("least_loaded")
    ls = [ReplicaLoad(0, True, 1000, 1), ReplicaLoad(1, True, 100, 5)]
    assert b.pick(ls) == 1


def test_least_loaded_equal_loads_share_traffic():
    b = Balancer("least_loaded")
    counts = collections.Counter(b.pick(loads(3)) for _ in range(300))
    assert counts == {0: 100, 1: 100, 2: 100}


def test_least_loaded_simulated_accounting_balances():
    # Each pick adds tokens to the chosen replica; the loads must stay within one request's worth.
    b = Balancer("least_loaded")
    tokens = [0, 0]
    for k in range(200):
        i = b.pick(loads(2, tokens=tokens))
        tokens[i] += 10 + (k % 7)
    assert abs(tokens[0] - tokens[1]) <= 17


@pytest.mark.parametrize("policy", ["round_robin", "random", "least_loaded"])
def test_exclusion_for_retry(policy):
    b = Balancer(policy, rng=random.Random(1))
    for _ in range(50):
        assert b.pick(loads(3), exclude=[0, 2]) == 1
    assert b.pick(loads(2), exclude={0, 1}) is None


@pytest.mark.parametrize("policy", ["round_robin", "random", "least_loaded"])
def test_all_unhealthy_or_empty_is_none(policy):
    b = Balancer(policy)
    assert b.pick(loads(3, unhealthy={0, 1, 2})) is None
    assert b.pick([]) is None


@pytest.mark.parametrize("policy", ["round_robin", "random", "least_loaded"])
def test_unhealthy_never_picked(policy):
    b = Balancer(policy, rng=random.Random(2))
    picks = {b.pick(loads(4, unhealthy={1, 3}, tokens=[50, 0, 60, 0])) for _ in range(200)}
    assert picks <= {0, 2} and picks


def test_unknown_policy_refused():
    with pytest.raises(ValueError, match="least_loaded"):
        Balancer("fastest")
