#!/usr/bin/env bash
# Set everything up on embedded defaults (SQLite, a local Redis, local image
# sources, local volume targets), start the OMA's and the agent's processes
# (web server + agent API, OMA worker, agent copy worker, beat, progress
# poller), replicate a generated 2-disk VM with live progress, and compare
# sha256 of every source disk with its target volume. libvirtd (the failover
# destination) and an isolated libvirt network (FAILOVER_TEST_NETWORK, default
# oma-demo-isolated) are started when missing, so the GUI's test failover
# works right after the demo; Flower runs behind a password (basic auth,
# var/flower-password) and the GUI links to it. KEEP_RUNNING=1 leaves the
# processes (and what was started for them) running afterwards; otherwise
# everything the demo started is stopped at the end, and nothing it found
# running. VMA_URL (default http://127.0.0.1:8000) sets the web server's
# port; FLOWER_PORT (5555) Flower's; CELERY_BROKER_URL the Redis (database).
set -euo pipefail
umask 077  # logs, database, volumes and sockets: this user's alone
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/lib.sh
mkdir -p var/log
ensure_redis

PY=.venv/bin/python
$PY manage.py migrate --no-input -v0

# Image sources are refused outside IMAGE_SOURCE_DIRS: the demo's images are
# made in var/demo, which every process here (web, workers) must allow.
export IMAGE_SOURCE_DIRS="$PWD/var/demo${IMAGE_SOURCE_DIRS:+,$IMAGE_SOURCE_DIRS}"

# The progress API refuses every request without a token: the copy loop (in
# the worker) and the API (in the web server) share one, kept under var/.
if [ -z "${VMA_TOKEN:-}" ]; then
  [ -s var/vma-token ] || (umask 077; $PY -c 'import secrets; print(secrets.token_urlsafe(32))' >var/vma-token)
  VMA_TOKEN=$(cat var/vma-token)
fi
export VMA_TOKEN

pids=()
started_network=""
started_daemons=()
cleanup() {
  if [ "${KEEP_RUNNING:-}" != "1" ]; then
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    $PY manage.py export_server stop >/dev/null 2>&1 || true
    # What the demo started for failovers, and only that.
    if [ -n "$started_network" ]; then
      virsh -q -c qemu:///system net-destroy "$started_network" >/dev/null 2>&1 || true
    fi
    for pid in "${started_daemons[@]}"; do kill "$pid" 2>/dev/null || true; done
  fi
}
trap cleanup EXIT

# The failover destination: libvirtd (started here when it is not running,
# and then stopped at the end) and an isolated network for test failovers
# (no forwarding: a test boot never reaches production).
running_daemons() { ps -C virtlogd,libvirtd -o pid= 2>/dev/null | tr -d ' ' | sort; }
before=$(running_daemons)
ensure_libvirtd
for pid in $(comm -13 <(echo "$before") <(running_daemons)); do started_daemons+=("$pid"); done
export FAILOVER_TEST_NETWORK=${FAILOVER_TEST_NETWORK:-oma-demo-isolated}
if ! virsh -q -c qemu:///system net-info "$FAILOVER_TEST_NETWORK" >/dev/null 2>&1; then
  echo "starting the isolated libvirt network $FAILOVER_TEST_NETWORK for test failovers"
  virsh -q -c qemu:///system net-create /dev/stdin >/dev/null <<XML
<network><name>$FAILOVER_TEST_NETWORK</name><bridge name='virbr-omademo' stp='off'/></network>
XML
  started_network=$FAILOVER_TEST_NETWORK
fi

# Flower, behind a password (basic auth, from the environment, never on a
# command line); the GUI links to it only when it runs.
FLOWER_PORT=${FLOWER_PORT:-5555}
[ -s var/flower-password ] || (umask 077; $PY -c 'import secrets; print(secrets.token_urlsafe(18))' >var/flower-password)
if (exec 3<>"/dev/tcp/127.0.0.1/$FLOWER_PORT") 2>/dev/null; then
  echo "port $FLOWER_PORT is taken: Flower not started, and the GUI does not link to it"
  export FLOWER_URL=""
else
  FLOWER_BASIC_AUTH="operator:$(cat var/flower-password)" PROCESS_ROLE=oma .venv/bin/celery -A oma_site flower \
    --address=127.0.0.1 --port="$FLOWER_PORT" >var/log/flower.log 2>&1 &
  pids+=($!)
  export FLOWER_URL="http://127.0.0.1:$FLOWER_PORT/"
fi

# The web server serves the pages and the agent's progress API (one host
# here); the copy loops and the poller reach it at VMA_URL.
export VMA_URL=${VMA_URL:-http://127.0.0.1:8000}
web_hostport=${VMA_URL#*://}; web_hostport=${web_hostport%%/*}
web_port=${web_hostport##*:}
mkdir -p var/run
if (exec 3<>"/dev/tcp/127.0.0.1/$web_port") 2>/dev/null; then
  # Someone else's server would refuse our token: every progress update
  # lost and the bars stuck at 0 %. Use it only if it takes our token.
  if ! $PY - "$VMA_URL" "$VMA_TOKEN" <<'PY'
import sys, requests
url, token = sys.argv[1:]
answer = requests.get(f"{url}/api/v1/progress/demo-token-check", headers={"Authorization": f"Bearer {token}"},
                      timeout=5)
sys.exit(0 if answer.status_code == 404 else 1)
PY
  then
    echo "port $web_port is taken by a server that refuses this demo's token (var/vma-token);" \
      "stop it or set VMA_URL=http://127.0.0.1:PORT to another port" >&2
    exit 1
  fi
  echo "using the web server already running at $VMA_URL"
else
  echo "starting the web server and agent API on $VMA_URL (log: var/log/web.log)"
  $PY manage.py runserver --noreload "127.0.0.1:$web_port" >var/log/web.log 2>&1 &
  pids+=($!)
fi

# One process per role, so nothing periodic or short waits behind a copy:
# the agent's worker copies (-Q vma.<agent>, 2 disks at a time); the OMA's
# worker runs the orchestration steps, the reaper and the sweeper (-Q oma);
# beat only queues those; the progress poller is its own loop.
agent_queue="vma.${VMA_AGENT_NAME:-local}"
CELERY=".venv/bin/celery -A oma_site"
echo "starting the OMA worker (-Q oma), the agent worker (-Q $agent_queue -c 2), beat and the progress poller" \
  "(logs: var/log/)"
PROCESS_ROLE=oma $CELERY worker -Q oma -c 2 -E -l info -n "demo-oma@%h" >var/log/oma-worker.log 2>&1 &
pids+=($!)
# The agent's worker holds no database (PROCESS_ROLE=agent), as on its own host.
PROCESS_ROLE=agent $CELERY worker -Q "$agent_queue" -c 2 -E -l info -n "demo-agent@%h" \
  >var/log/agent-worker.log 2>&1 &
pids+=($!)
PROCESS_ROLE=oma $CELERY beat -l info >var/log/beat.log 2>&1 &
pids+=($!)
PROCESS_ROLE=oma $PY manage.py poll_progress >var/log/poller.log 2>&1 &
pids+=($!)
for log in var/log/oma-worker.log var/log/agent-worker.log; do
  for _ in $(seq 150); do grep -q " ready." "$log" 2>/dev/null && break; sleep 0.2; done
  grep -q " ready." "$log" || { echo "worker did not start; see $log" >&2; exit 1; }
done
for _ in $(seq 100); do
  $PY - "$VMA_URL" <<'PY' 2>/dev/null && break
import sys, requests
requests.get(f"{sys.argv[1]}/api/v1/openapi.json", timeout=1).raise_for_status()
PY
  sleep 0.2
done

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
echo
echo "GUI: $VMA_URL/ (test failovers boot on the isolated network $FAILOVER_TEST_NETWORK)"
if [ -n "$FLOWER_URL" ]; then
  echo "Flower: $FLOWER_URL (user operator, password in var/flower-password)"
fi
