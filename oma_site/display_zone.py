"""Every request renders times in the operator's zone: the one their browser
names in the `tz` cookie (set by replication/static/replication/zone.js on
every page and in the admin), else settings.TIME_ZONE_DISPLAY (before the
browser has said, or when it names a zone this server does not know).
Pages write times through the `when` filter, the admin through
DATETIME_FORMAT, both with the zone's abbreviation."""

import functools
import zoneinfo

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.utils import timezone

COOKIE = "tz"


def display_zone():
    try:
        return zoneinfo.ZoneInfo(settings.TIME_ZONE_DISPLAY)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise ImproperlyConfigured(f"TIME_ZONE_DISPLAY={settings.TIME_ZONE_DISPLAY!r} is not a time zone name "
                                   "such as UTC or Europe/Berlin") from exc


@functools.cache
def known_zones() -> frozenset[str]:
    """The zone database's names (read once: it walks the zoneinfo files)."""
    return frozenset(zoneinfo.available_timezones())


class DisplayZoneMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response
        self.default = display_zone()  # a wrong name stops the server at start, with the reason
        # The cookie is the client's word: only a name from the zone database
        # is opened (never a path), anything else means the default.
        self.known = known_zones()

    def zone_of(self, request):
        name = request.COOKIES.get(COOKIE, "")
        return zoneinfo.ZoneInfo(name) if name in self.known else self.default

    def __call__(self, request):
        with timezone.override(self.zone_of(request)):
            return self.get_response(request)
