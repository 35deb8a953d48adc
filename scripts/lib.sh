# Shared helpers for the project's scripts (sourced, not run).

redis_url_host_port() {  # prints "host port" of CELERY_BROKER_URL (default 127.0.0.1 6379)
  local url=${CELERY_BROKER_URL:-redis://127.0.0.1:6379/0}
  local hostport=${url#redis://}; hostport=${hostport#*@}; hostport=${hostport%%/*}
  echo "${hostport%%:*} ${hostport##*:}"
}

ensure_redis() {
  read -r host port < <(redis_url_host_port)
  if redis-cli -h "$host" -p "$port" ping >/dev/null 2>&1; then
    return 0
  fi
  if [ "$host" != "127.0.0.1" ] && [ "$host" != "localhost" ]; then
    echo "Redis at $host:$port does not answer; start it or fix CELERY_BROKER_URL" >&2
    return 1
  fi
  echo "starting a local Redis on 127.0.0.1:$port"
  redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --save "" --appendonly no \
    --logfile "$PWD/var/redis.log" --dir "$PWD/var"
  for _ in $(seq 50); do
    redis-cli -h 127.0.0.1 -p "$port" ping >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "Redis did not start; see var/redis.log" >&2
  return 1
}

ensure_libvirtd() {  # the failover destination: libvirtd (and virtlogd) for qemu:///system
  # No systemd on these machines: start the daemons ourselves when they are not
  # running. The first answer after a start takes several seconds (QEMU probe).
  if timeout 15 virsh -c qemu:///system version >/dev/null 2>&1; then
    return 0
  fi
  if ! command -v libvirtd >/dev/null 2>&1; then
    echo "libvirtd is not installed; run scripts/setup.sh (libvirt-daemon-system)" >&2
    return 1
  fi
  if [ "$(id -u)" -ne 0 ]; then
    echo "libvirtd does not answer on qemu:///system; start it as root: virtlogd -d && libvirtd -d" >&2
    return 1
  fi
  # A daemon that is still shutting down shows as a zombie (<defunct>) while
  # its threads finish and still holds its pidfile: keep trying to start one
  # until a live daemon answers, within the deadline.
  local deadline=$((SECONDS + 60)) started="" daemon
  while [ "$SECONDS" -lt "$deadline" ]; do
    for daemon in virtlogd libvirtd; do
      if ! ps -C "$daemon" -o stat= 2>/dev/null | grep -qv Z; then
        case " $started " in *" $daemon "*) ;; *) echo "starting $daemon"; started="$started $daemon";; esac
        "$daemon" -d 2>/dev/null || true
      fi
    done
    timeout 15 virsh -c qemu:///system version >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  echo "libvirtd did not answer on qemu:///system within 60 s; start it by hand with" \
       "'virtlogd -d && libvirtd -d' and check 'virsh -c qemu:///system version'" >&2
  return 1
}
