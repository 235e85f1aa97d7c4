"""M/M/c queueing formulas used by the operator-queueing controller.

Units: rates are per second, times are in seconds. ``c`` is the number of servers
(replicas), ``offered_load`` (``a``) is ``arrival_rate / service_rate`` in Erlangs.

Erlang C is computed through the Erlang B recursion
``B(0) = 1, B(k) = a B(k-1) / (k + a B(k-1))`` which stays in [0, 1] for every ``k`` and
never forms ``a**c`` or ``c!``, so it is stable for hundreds of servers.
"""
from __future__ import annotations

import math


def erlang_b(c: int, offered_load: float) -> float:
    """Blocking probability of an M/M/c/c loss system (Erlang B).

    Args:
        c: servers, >= 0.
        offered_load: arrival rate / service rate (Erlangs), >= 0.
    """
    if c < 0:
        raise ValueError(f"servers c must be >= 0, got {c}")
    if offered_load < 0 or not math.isfinite(offered_load):
        raise ValueError(f"offered_load must be a finite number >= 0, got {offered_load}")
    b = 1.0
    for k in range(1, c + 1):
        b = offered_load * b / (k + offered_load * b)
    return b


def erlang_c(c: int, offered_load: float) -> float:
    """Probability that an arrival waits in an M/M/c queue (Erlang C).

    Returns 1.0 when the queue is unstable (``offered_load >= c``).
    """
    if c < 1:
        raise ValueError(f"servers c must be >= 1, got {c}")
    if offered_load >= c:
        return 1.0
    if offered_load <= 0.0:
        return 0.0
    b = erlang_b(c, offered_load)
    rho = offered_load / c
    return b / (1.0 - rho * (1.0 - b))


def mmc_wait(arrival_rate: float, service_rate: float, c: int) -> float:
    """Mean time in queue ``Wq`` of an M/M/c queue (seconds); ``inf`` when unstable.

    ``Wq = C(c, a) / (c mu - lambda)``; with ``c = 1`` this is ``rho / (mu - lambda)``.
    """
    if service_rate <= 0:
        raise ValueError(f"service_rate must be > 0, got {service_rate}")
    if arrival_rate < 0:
        raise ValueError(f"arrival_rate must be >= 0, got {arrival_rate}")
    if arrival_rate == 0.0:
        return 0.0
    spare = c * service_rate - arrival_rate
    if spare <= 0.0:
        return math.inf
    return erlang_c(c, arrival_rate / service_rate) / spare


def mmc_sojourn(arrival_rate: float, service_rate: float, c: int) -> float:
    """Mean time in system (wait + service) of an M/M/c queue (seconds)."""
    return mmc_wait(arrival_rate, service_rate, c) + 1.0 / service_rate


def mmc_wait_quantile(arrival_rate: float, service_rate: float, c: int, q: float) -> float:
    """The ``q`` quantile of the waiting time of an M/M/c queue (seconds).

    The wait is 0 with probability ``1 - C`` and otherwise exponential with rate
    ``c mu - lambda``, so ``P(W > t) = C exp(-(c mu - lambda) t)``.
    """
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile q must be in (0, 1), got {q}")
    if arrival_rate == 0.0:
        return 0.0
    spare = c * service_rate - arrival_rate
    if spare <= 0.0:
        return math.inf
    p_wait = erlang_c(c, arrival_rate / service_rate)
    if p_wait <= 1.0 - q:
        return 0.0
    return math.log(p_wait / (1.0 - q)) / spare


def min_servers(arrival_rate: float, service_rate: float, max_utilisation: float = 1.0) -> int:
    """Fewest servers that keep utilisation ``lambda / (c mu)`` at or below ``max_utilisation``
    (and strictly below 1)."""
    if not 0.0 < max_utilisation <= 1.0:
        raise ValueError(f"max_utilisation must be in (0, 1], got {max_utilisation}")
    a = arrival_rate / service_rate
    c = max(1, math.ceil(a / max_utilisation - 1e-12))
    while c <= a:
        c += 1
    return c
