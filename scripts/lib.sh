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
