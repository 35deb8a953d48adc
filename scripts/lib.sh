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
  # Directories an earlier daemon made under umask 077 are repaired too.
  local dir
  for dir in /run/libvirt/qemu /var/log/swtpm /var/log/swtpm/libvirt /var/lib/libvirt/swtpm; do
    [ -d "$dir" ] && chmod go+x "$dir"
  done
  local deadline=$((SECONDS + 60)) started="" daemon
  while [ "$SECONDS" -lt "$deadline" ]; do
    for daemon in virtlogd libvirtd; do
      if ! ps -C "$daemon" -o stat= 2>/dev/null | grep -qv Z; then
        case " $started " in *" $daemon "*) ;; *) echo "starting $daemon"; started="$started $daemon";; esac
        # A system daemon keeps the system's umask, not the tests' 077: libvirtd
        # creates swtpm's state and log directories with it, and a 0700 root
        # directory stops swtpm (running as tss) from starting any vTPM.
        (umask 022; "$daemon" -d 2>/dev/null) || true
      fi
    done
    timeout 15 virsh -c qemu:///system version >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  echo "libvirtd did not answer on qemu:///system within 60 s; start it by hand with" \
       "'virtlogd -d && libvirtd -d' and check 'virsh -c qemu:///system version'" >&2
  return 1
}

ensure_agent_sshd() {  # the OMA's own sshd for agents' outbound tunnels (never the system sshd)
  # Its config, host key, pidfile, log and the agents' authorized_keys
  # (written by replication/services/tunnels.py) live in AGENT_SSH_DIR; it
  # listens on AGENT_SSH_PORT (443 in production) and lets in only
  # AGENT_SSH_USER, an unprivileged account with no shell, by key only.
  local dir=${AGENT_SSH_DIR:-$PWD/var/agent-ssh} port=${AGENT_SSH_PORT:-2222}
  local user=${AGENT_SSH_USER:-oma-agents} listen=${AGENT_SSH_LISTEN:-0.0.0.0}
  if [ -f "$dir/sshd.pid" ] && kill -0 "$(cat "$dir/sshd.pid")" 2>/dev/null; then
    return 0
  fi
  if [ ! -x /usr/sbin/sshd ]; then
    echo "sshd is not installed; run scripts/setup.sh (openssh-server)" >&2
    return 1
  fi
  if [ "$(id -u)" -ne 0 ]; then
    echo "the agents' sshd must start as root (it switches to $user per session): run ensure_agent_sshd as root" >&2
    return 1
  fi
  if ! id "$user" >/dev/null 2>&1; then
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$user"
  fi
  usermod -p '*' "$user"  # no password, but not locked: sshd refuses a locked account even by key
  mkdir -p "$dir" /run/sshd
  chmod 755 "$dir"
  [ -f "$dir/ssh_host_ed25519_key" ] || ssh-keygen -q -t ed25519 -N "" -f "$dir/ssh_host_ed25519_key"
  touch "$dir/authorized_keys"
  chmod 644 "$dir/authorized_keys"
  cat > "$dir/sshd_config" <<CONF
# The OMA's sshd for agents' tunnels (scripts/lib.sh ensure_agent_sshd). Each
# agent's key line in authorized_keys says what it may forward.
Port $port
ListenAddress $listen
HostKey $dir/ssh_host_ed25519_key
PidFile $dir/sshd.pid
# The OMA's var/ is private (0700) and sshd reads a key file as the user
# logging in: it gets the agents' lines from a command run as root instead.
AuthorizedKeysFile none
AuthorizedKeysCommand /bin/cat $dir/authorized_keys
AuthorizedKeysCommandUser root
AllowUsers $user
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PermitRootLogin no
StrictModes no
AllowTcpForwarding yes
GatewayPorts no
AllowAgentForwarding no
AllowStreamLocalForwarding no
X11Forwarding no
PermitTunnel no
PermitTTY no
ClientAliveInterval 15
ClientAliveCountMax 3
LogLevel VERBOSE
CONF
  /usr/sbin/sshd -t -f "$dir/sshd_config" || { echo "the agents' sshd config is refused (above)" >&2; return 1; }
  echo "starting the agents' sshd on $listen:$port"
  /usr/sbin/sshd -f "$dir/sshd_config" -E "$dir/sshd.log" || { echo "the agents' sshd did not start; see $dir/sshd.log" >&2; return 1; }
  for _ in $(seq 50); do
    [ -f "$dir/sshd.pid" ] && kill -0 "$(cat "$dir/sshd.pid")" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "the agents' sshd did not start; see $dir/sshd.log" >&2
  return 1
}
