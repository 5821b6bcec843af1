"""What the orphan sweeper bills a call by when its gateway is gone: the hold info written
at admission, read back by every version that may sweep it."""

from __future__ import annotations

from gateway.accounts.orphans import HoldInfo
from tests.billing.checks import expected_cost


def test_round_trip_and_earlier_versions() -> None:
    info = HoldInfo("m", 120, 150_000, 600_000, "k1", True, "ps_abc", flat=None, cap=50_000)
    assert HoldInfo.decode(info.encode()) == info
    flat = HoldInfo("m", 0, 0, 0, "k1", False, "", flat=2500)
    assert HoldInfo.decode(flat.encode()) == flat
    # Six fields (before price versions) and seven (before flat prices and caps).
    assert HoldInfo.decode("m\t120\t150000\t600000\tk1\t1") == HoldInfo(
        "m", 120, 150_000, 600_000, "k1", True
    )
    assert HoldInfo.decode("m\t120\t150000\t600000\tk1\t0\tps_x") == HoldInfo(
        "m", 120, 150_000, 600_000, "k1", False, "ps_x"
    )
    assert HoldInfo.decode("") is None
    assert HoldInfo.decode("m\t1\t2") is None


def test_the_cost_without_a_gateway() -> None:
    """Tokens at the admitted prices (checked against exact fractions), a passthrough call
    at its price whatever it did, and never more than the client's cap."""
    plain = HoldInfo("m", 1234, 333_333, 1_777_777, "k", True)
    assert plain.cost(77) == expected_cost(1234, 77, "0.333333", "1.777777")
    capped = HoldInfo("m", 1234, 333_333, 1_777_777, "k", True, cap=100)
    assert expected_cost(1234, 77, "0.333333", "1.777777") > 100
    assert capped.cost(77) == 100
    assert HoldInfo("m", 0, 0, 0, "k", False, flat=2500).cost(999) == 2500
    assert HoldInfo("m", 0, 0, 0, "k", False, flat=2500, cap=1000).cost(0) == 1000
