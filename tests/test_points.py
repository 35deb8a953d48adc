"""Recovery points' rules without a copy: which points retention keeps, the
point a failover boots, and what a failover may do beside a running cycle."""

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest

from replication.services import points


def at(hours_ago: float, now: datetime) -> SimpleNamespace:
    return SimpleNamespace(pk=int(hours_ago * 100), frozen_at=now - timedelta(hours=hours_ago))


NOW = datetime(2026, 12, 7, 12, 30, tzinfo=UTC)


def test_retention_keeps_the_newest_n():
    every_10_min = [at(h / 6, NOW) for h in range(12)]  # newest first
    assert points.to_keep(every_10_min, 3, 0, 0, NOW) == {p.pk for p in every_10_min[:3]}


def test_retention_always_keeps_the_newest_even_with_keep_zero():
    only = [at(0.1, NOW), at(5, NOW)]
    assert points.to_keep(only, 0, 0, 0, NOW) == {only[0].pk}


def test_retention_keeps_the_newest_point_of_each_hour_and_day_in_their_spans():
    every_20_min = [at(h / 3, NOW) for h in range(3 * 50)]  # 50 hours of points, newest first
    kept = points.to_keep(every_20_min, 2, 3, 2, NOW)
    hours_kept = sorted({p.frozen_at.strftime("%d %H") for p in every_20_min if p.pk in kept})
    # the newest 2, then one per hour for the last 3 hours (12:xx, 11:xx, 10:xx, 09:xx at the edge),
    # then one per day for 2 days (the 7th, the 6th, and the 5th at the edge)
    per_hour = [p for p in every_20_min if p.pk in kept and NOW - p.frozen_at <= timedelta(hours=3)]
    assert len({p.frozen_at.strftime("%H") for p in per_hour}) == len(per_hour) - 1  # the 2 newest share 12:xx
    days = {p.frozen_at.strftime("%d") for p in every_20_min if p.pk in kept}
    assert days == {"07", "06", "05"}
    assert len(kept) < len(every_20_min) / 10, hours_kept
    # Each kept hourly point is the newest of its hour.
    for p in per_hour[2:]:
        same_hour = [q for q in every_20_min if q.frozen_at.strftime("%d%H") == p.frozen_at.strftime("%d%H")]
        assert p is same_hour[0]


@pytest.mark.django_db
def test_a_vm_without_a_point_cannot_fail_over_and_an_unknown_point_is_named(tmp_path):
    from replication.services.inventory import register_image_vm

    image = tmp_path / "d.img"
    image.write_bytes(b"\0" * 4096)
    vm = register_image_vm("nopoint", [str(image)])
    with pytest.raises(points.PointError, match="no recovery point yet"):
        points.chosen(vm)
    with pytest.raises(points.PointError, match="has no recovery point 999"):
        points.chosen(vm, 999)
    assert points.summary(vm) == {"count": 0, "newest_age_s": None, "oldest_age_s": None}
