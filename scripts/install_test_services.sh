#!/usr/bin/env bash
# System services the team-mode integration tests start for themselves (tests/test_team.py):
#   openssh-server  sshd inside network namespaces: Horovod workers on two "hosts"
#   postgresql      a throwaway cluster (initdb + pg_ctl) behind an MLflow tracking server
#   iproute2        `ip netns` / veth / bridge for those hosts
# Idempotent and quick when everything is present: apt-get runs only for what is missing,
# and only as root. No service is enabled or started here; the tests start their own.
set -euo pipefail

log() { printf '[test-services] %s\n' "$*"; }

have_sshd()     { [ -x /usr/sbin/sshd ]; }
have_postgres() { compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null && compgen -G '/usr/lib/postgresql/*/bin/pg_ctl' >/dev/null; }
have_ip()       { command -v ip >/dev/null 2>&1 || [ -x /usr/sbin/ip ] || [ -x /sbin/ip ]; }

missing=()
have_sshd     || missing+=(openssh-server)
have_postgres || missing+=(postgresql)
have_ip       || missing+=(iproute2)

if [ ${#missing[@]} -eq 0 ]; then
  log "openssh-server, postgresql and iproute2 already present"
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  log "missing: ${missing[*]}; run as root to install them (the team-mode tests will skip without them)"
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  log "missing: ${missing[*]} and no apt-get here; install them with your package manager"
  exit 1
fi

# Never start services during the install (containers have no init; the tests start their
# own sshd and PostgreSQL), and do not create Debian's default "main" cluster.
policy_created=0
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod +x /usr/sbin/policy-rc.d
  policy_created=1
fi
no_main_cluster=/etc/postgresql-common/createcluster.d/zz-slimflow-tests.conf
no_main_created=0
if [[ " ${missing[*]} " == *" postgresql "* ]] && [ ! -e "$no_main_cluster" ]; then
  mkdir -p "$(dirname "$no_main_cluster")"
  printf 'create_main_cluster = false\n' > "$no_main_cluster"
  no_main_created=1
fi
cleanup() {
  if [ "$policy_created" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
  if [ "$no_main_created" = 1 ]; then rm -f "$no_main_cluster"; fi
}
trap cleanup EXIT

log "installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# sshd's privilege-separation directory (normally made by its service unit).
mkdir -p /run/sshd
chmod 0755 /run/sshd

have_sshd && have_postgres && have_ip || { log "install finished but something is still missing"; exit 1; }
log "done"
