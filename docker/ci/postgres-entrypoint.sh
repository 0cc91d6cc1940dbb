#!/bin/sh
# docker/ci/Dockerfile.postgres: on the first start of `postgres`, an empty PGDATA becomes a cluster with
# POSTGRES_USER (superuser, password POSTGRES_PASSWORD, scram-sha-256 over TCP) and POSTGRES_DB, set up by a
# server listening on its socket only (as the official image does); then the server itself replaces this shell.
set -eu
if [ "${1:-}" = postgres ] && [ ! -s "$PGDATA/PG_VERSION" ]; then
    : "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD must be set}"
    user="${POSTGRES_USER:-postgres}"
    db="${POSTGRES_DB:-$user}"
    pwfile="$(mktemp)"
    printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
    initdb -D "$PGDATA" -U "$user" --pwfile="$pwfile" -E UTF8 --auth-local=trust --auth-host=scram-sha-256
    rm -f "$pwfile"
    echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
    echo "listen_addresses = '*'" >> "$PGDATA/postgresql.conf"
    pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start
    if [ "$db" != postgres ]; then  # initdb made only "postgres" (and the templates)
        createdb -U "$user" "$db"
    fi
    pg_ctl -D "$PGDATA" -m fast -w stop
    echo "docker-entrypoint.sh: PostgreSQL cluster ready: role $user, database $db"
fi
exec "$@"
