#!/usr/bin/env bash
# Run the whole test suite: ruff, then pytest on SQLite, then on MariaDB.
# Extra arguments go to pytest (e.g. scripts/test.sh -k copy_engine).
set -euo pipefail
umask 077  # as in production: what the tests create is private
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/lib.sh
ensure_redis
ensure_libvirtd

echo "== ruff"
.venv/bin/ruff check .

# The production settings the README documents must pass Django's deployment
# checks with no warning at all.
echo "== manage.py check --deploy (production settings)"
env -u DEBUG -u DATABASE_URL HTTPS=1 ALLOWED_HOSTS=oma.example.com \
  .venv/bin/python manage.py check --deploy --fail-level WARNING

echo "== tests on SQLite"
env -u DATABASE_URL .venv/bin/python -m pytest "$@"

MYSQL_URL=${TEST_MYSQL_URL:-mysql://root@127.0.0.1:3306/oma}
if .venv/bin/python - "$MYSQL_URL" <<'PY' 2>/dev/null
import sys, environ, MySQLdb
cfg = environ.Env.db_url_config(sys.argv[1])
MySQLdb.connect(host=cfg["HOST"], port=int(cfg["PORT"] or 3306), user=cfg["USER"], passwd=cfg["PASSWORD"]).close()
PY
then
  echo "== tests on MariaDB ($MYSQL_URL)"
  DATABASE_URL="$MYSQL_URL" .venv/bin/python -m pytest "$@"
  # The fault-injection suite (workers killed, brokers restarted) needs the
  # real database server: it runs in this pass only, then prints its figures.
  echo "== fault-injection suite on MariaDB"
  DATABASE_URL="$MYSQL_URL" .venv/bin/python -m tests.faults --run "$@"
else
  # Never a silent skip: without MariaDB the MariaDB pass and the fault suite
  # do not run, and that is a failure, here as in CI.
  echo "FAILED: MariaDB at $MYSQL_URL does not answer, so the MariaDB pass and the fault-injection suite" \
       "cannot run. Start MariaDB (root without a password on 127.0.0.1:3306) or point TEST_MYSQL_URL at one." >&2
  exit 1
fi
