"""Every request renders times in the operators' zone (settings.TIME_ZONE_DISPLAY):
pages through the `when` filter, the admin through DATETIME_FORMAT."""

import zoneinfo

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.utils import timezone


def display_zone():
    try:
        return zoneinfo.ZoneInfo(settings.TIME_ZONE_DISPLAY)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise ImproperlyConfigured(f"TIME_ZONE_DISPLAY={settings.TIME_ZONE_DISPLAY!r} is not a time zone name "
                                   "such as UTC or Europe/Berlin") from exc


class DisplayZoneMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response
        self.zone = display_zone()  # a wrong name stops the server at start, with the reason

    def __call__(self, request):
        with timezone.override(self.zone):
            return self.get_response(request)
