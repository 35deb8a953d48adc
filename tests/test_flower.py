"""Flower, started with the README's command, needs its password."""

import base64
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from django.conf import settings

from tests.helpers import PROJECT_ROOT, free_port, wait_until

pytestmark = pytest.mark.integration


def get(url, auth=None):
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def test_flower_starts_with_basic_auth_from_the_environment():
    port = free_port()
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "oma_site.test_settings",
           "CELERY_BROKER_URL": settings.CELERY_BROKER_URL, "FLOWER_BASIC_AUTH": "operator:flower-secret"}
    flower = subprocess.Popen([sys.executable, "-m", "celery", "-A", "oma_site", "flower", "--address=127.0.0.1",
                               f"--port={port}"], cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/"
        def answer():
            assert flower.poll() is None, "flower exited"
            try:
                return get(url)
            except OSError:
                return None

        status, _ = wait_until(answer, 30, "flower to answer", interval=0.2)
        assert status == 401
        assert get(url, "operator:wrong")[0] == 401
        status, body = get(url, "operator:flower-secret")
        assert status == 200 and "Flower" in body
    finally:
        flower.terminate()
        flower.wait(10)
