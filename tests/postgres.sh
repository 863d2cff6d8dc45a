#!/bin/bash
# Bring up Debian's PostgreSQL without systemd for the queue's store tests (tests/test_queue_*).
#
#   bash tests/postgres.sh          # install, start the cluster, create the test role (idempotent)
#   bash tests/postgres.sh stop     # stop the cluster, if this script started it
#
# Run as root on Debian 12. The tests get the URL of a database they may create other databases
# from (tests/support/postgres.py makes a fresh one per test and drops it afterwards):
#     postgresql://monitor_test:monitor_test@127.0.0.1:5432/monitor_test
# The role may create databases and nothing else; its password is no secret (loopback only,
# a throw-away cluster). pg_ctlcluster starts the cluster by itself when systemd is not PID 1.
set -euo pipefail

ROLE=monitor_test
PASSWORD=monitor_test
DATABASE=monitor_test
# Set when this script started the cluster, so that `stop` leaves one it found running alone.
STATE=/run/monitor-test-postgres.started

if [ "$(id -u)" != 0 ]; then
    echo "postgres.sh: must run as root" >&2
    exit 1
fi

cluster() {  # VERSION NAME of the first cluster, as pg_lsclusters lists them
    pg_lsclusters --no-header 2>/dev/null | awk 'NR == 1 {print $1, $2}'
}

if [ "${1:-start}" = stop ]; then
    if [ -f "$STATE" ]; then
        read -r version name < "$STATE"
        pg_ctlcluster "$version" "$name" stop -m fast || true
        rm -f "$STATE"
    fi
    exit 0
fi

if ! dpkg-query -W -f='${Status}' postgresql 2>/dev/null | grep -q 'install ok installed'; then
    apt-get update -q >/dev/null
    # The package's postinst creates the cluster `main` (and would start it with systemd).
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql >/dev/null
fi
if [ -z "$(cluster)" ]; then
    pg_createcluster "$(ls /usr/lib/postgresql | sort -n | tail -1)" main >/dev/null
fi
read -r version name <<< "$(cluster)"
if ! pg_lsclusters --no-header | awk -v v="$version" -v n="$name" '$1 == v && $2 == n' \
        | grep -q online; then
    pg_ctlcluster "$version" "$name" start
    echo "$version $name" > "$STATE"
fi
for i in $(seq 1 200); do
    su postgres -c "psql -qAtc 'select 1'" >/dev/null 2>&1 && break
    if [ "$i" = 200 ]; then
        echo "postgres.sh: PostgreSQL not ready after 20 s" >&2
        exit 1
    fi
    sleep 0.1
done

psql_admin() { su postgres -c "psql -v ON_ERROR_STOP=1 -qAt -c \"$1\""; }
if [ "$(psql_admin "select 1 from pg_roles where rolname = '$ROLE'")" != 1 ]; then
    psql_admin "create role $ROLE login createdb password '$PASSWORD'"
fi
if [ "$(psql_admin "select 1 from pg_database where datname = '$DATABASE'")" != 1 ]; then
    psql_admin "create database $DATABASE owner $ROLE"
fi
# Debian's pg_hba.conf allows password logins (scram) from 127.0.0.1 already.
PGPASSWORD=$PASSWORD psql -qAt -h 127.0.0.1 -U "$ROLE" -d "$DATABASE" -c 'select 1' >/dev/null
echo "postgres.sh: PostgreSQL $version/$name ready: postgresql://$ROLE:$PASSWORD@127.0.0.1:5432/$DATABASE"
