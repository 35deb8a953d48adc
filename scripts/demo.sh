#!/usr/bin/env bash
# Set everything up on embedded defaults (SQLite, a local Redis, local image
# sources, local volume targets), start a Celery worker and the web server,
# replicate a generated 2-disk VM with live progress, and compare sha256 of
# every source disk with its target volume. KEEP_RUNNING=1 leaves the worker
# and the web server running afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/lib.sh
mkdir -p var/log
ensure_redis

PY=.venv/bin/python
$PY manage.py migrate --no-input -v0

# The progress API refuses every request without a token: the copy loop (in
# the worker) and the API (in the web server) share one, kept under var/.
if [ -z "${VMA_TOKEN:-}" ]; then
  [ -s var/vma-token ] || (umask 077; $PY -c 'import secrets; print(secrets.token_urlsafe(32))' >var/vma-token)
  VMA_TOKEN=$(cat var/vma-token)
fi
export VMA_TOKEN

pids=()
cleanup() {
  if [ "${KEEP_RUNNING:-}" != "1" ]; then
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    $PY manage.py export_server stop >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT

echo "starting a Celery worker with beat: copies, progress poller, reaper (log: var/log/worker.log)"
mkdir -p var/run
.venv/bin/celery -A oma_site worker -B -s var/run/celerybeat-schedule -E -c 2 -l info -n "demo@%h" \
  >var/log/worker.log 2>&1 &
pids+=($!)
if ! (exec 3<>/dev/tcp/127.0.0.1/8000) 2>/dev/null; then
  echo "starting the web server on http://127.0.0.1:8000/ (log: var/log/web.log)"
  $PY manage.py runserver --noreload 127.0.0.1:8000 >var/log/web.log 2>&1 &
  pids+=($!)
fi
for _ in $(seq 100); do grep -q " ready." var/log/worker.log 2>/dev/null && break; sleep 0.2; done

$PY scripts/make_demo_images.py "$PWD/var/demo"
if ! $PY manage.py volumes demo-vm >/dev/null 2>&1; then
  $PY manage.py add_vm demo-vm --disk "$PWD/var/demo/demo-disk0.img" --disk "$PWD/var/demo/demo-disk1.img"
fi
$PY manage.py replicate demo-vm --full --wait

echo
echo "sha256 of each source disk and its target volume:"
$PY manage.py checksums demo-vm
echo
$PY manage.py jobs --limit 5
