# shellcheck shell=bash
# Shared functions for deploy/local/{up,down,status}. Sourced, never executed.
#
# Layout (all generated, nothing here is committed):
#   $STACK                 ${COMPLIANCE_STACK_DIR:-<checkout>/.stack}
#   $STACK/secrets.env     generated once, mode 0600, reused afterwards
#   $STACK/gateway.env     what the gateway reads (mode 0600)
#   $STACK/logs/           one log per component
#   $STACK/run/            pid files and the lock serialising up/down
#   $STACK/<component>/    state of each server
#   $CACHE                 ${COMPLIANCE_CACHE_DIR:-$HOME/.cache/compliance-stack}: verified downloads

# Everything up/down/status write is private to its writer (see "Permissions" below).
umask 077
LIB_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DEPLOY_DIR="$(cd "$LIB_DIR/.." && pwd)"
CHECKOUT="$(cd "$LIB_DIR/../.." && pwd)"
STACK="${COMPLIANCE_STACK_DIR:-$CHECKOUT/.stack}"
CACHE="${COMPLIANCE_CACHE_DIR:-$HOME/.cache/compliance-stack}"
STACK_USER="${COMPLIANCE_STACK_USER:-compliance-stack}"

# shellcheck source=versions.env
. "$LIB_DIR/versions.env"
. "$LIB_DIR/stamp.sh"

ALL_COMPONENTS=(orthanc keycloak elasticsearch es_proxy postgres)

# Ports: overridable, so a second stack (another COMPLIANCE_STACK_DIR) can run beside the first one.
ORTHANC_PORT=${COMPLIANCE_ORTHANC_PORT:-8042}
KEYCLOAK_PORT=${COMPLIANCE_KEYCLOAK_PORT:-8180}
ELASTICSEARCH_PORT=${COMPLIANCE_ELASTICSEARCH_PORT:-9200}
ELASTICSEARCH_TRANSPORT_PORT=${COMPLIANCE_ELASTICSEARCH_TRANSPORT_PORT:-9300}
ES_PROXY_PORT=${COMPLIANCE_ES_PROXY_PORT:-9201}  # the secured endpoint: TLS + credentials in front of Elasticsearch
POSTGRES_PORT=${COMPLIANCE_POSTGRES_PORT:-55432}
BIND=127.0.0.1

# Start-up timeouts (seconds).
ORTHANC_TIMEOUT=${COMPLIANCE_ORTHANC_TIMEOUT:-60}
KEYCLOAK_TIMEOUT=${COMPLIANCE_KEYCLOAK_TIMEOUT:-300}
ELASTICSEARCH_TIMEOUT=${COMPLIANCE_ELASTICSEARCH_TIMEOUT:-240}
POSTGRES_TIMEOUT=${COMPLIANCE_POSTGRES_TIMEOUT:-60}

# ---------------------------------------------------------------------------------------------
# small helpers

log()  { printf '[stack] %s\n' "$*" >&2; }
warn() { printf '[stack] WARNING: %s\n' "$*" >&2; }
die()  { printf '[stack] ERROR: %s\n' "$*" >&2; exit 1; }

is_root() { [[ $EUID -eq 0 ]]; }

now() { date +%s; }

valid_component() {
  local c
  for c in "${ALL_COMPONENTS[@]}"; do [[ $c == "$1" ]] && return 0; done
  return 1
}

# parse_components ARGS... -> sets COMPONENTS (defaults to all, validated, de-duplicated)
parse_components() {
  COMPONENTS=()
  local c seen=" "
  if [[ $# -eq 0 ]]; then set -- "${ALL_COMPONENTS[@]}"; fi
  for c in "$@"; do
    case $c in -h|--help) usage; exit 0 ;; esac
    valid_component "$c" || die "unknown component '$c' (known: ${ALL_COMPONENTS[*]})"
    [[ $seen == *" $c "* ]] && continue
    seen+="$c "
    COMPONENTS+=("$c")
  done
}

# port_open PORT -> 0 when something accepts TCP connections on 127.0.0.1:PORT
port_open() { (exec 3<>"/dev/tcp/$BIND/$1") 2>/dev/null; }

# print the last 40 lines of the given log files
show_logs() {
  local f
  for f in "$@"; do
    [[ -f $f ]] || continue
    printf '[stack] ----- last 40 lines of %s -----\n' "$f" >&2
    tail -n 40 "$f" >&2 || true
    printf '[stack] ----- end of %s -----\n' "$f" >&2
  done
}

# wait_until TIMEOUT CMD... : poll CMD every second until it succeeds or TIMEOUT elapses
wait_until() {
  local timeout=$1; shift
  local deadline=$(( $(now) + timeout ))
  while (( $(now) < deadline )); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 1
  done
  "$@" >/dev/null 2>&1
}

# ---------------------------------------------------------------------------------------------
# processes: every server runs as $STACK_USER (or as the invoking user when not root)

# RUN_AS: command prefix dropping privileges; HOME points into the stack so nothing writes to /root
set_run_as() {
  if is_root; then
    RUN_AS=(setpriv "--reuid=$STACK_USER" "--regid=$STACK_USER" --init-groups
            env "HOME=$STACK/home" "USER=$STACK_USER" "LOGNAME=$STACK_USER")
  else
    RUN_AS=(env "HOME=$STACK/home")
  fi
}

run_as() { "${RUN_AS[@]}" "$@"; }

# own PATH... : give the stack user the given paths (no-op when not root)
own() { if is_root; then chown -R "$STACK_USER:$STACK_USER" "$@"; fi; }

pidfile() { printf '%s/run/%s.pid' "$STACK" "$1"; }

# pid_of COMPONENT -> prints the pid when its process is alive (and looks like that component)
pid_of() {
  local comp=$1 f pid pattern
  f=$(pidfile "$comp")
  [[ -r $f ]] || return 1
  pid=$(head -n1 "$f" 2>/dev/null | tr -dc '0-9')
  [[ -n $pid ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  case $comp in
    orthanc)       pattern='Orthanc' ;;
    keycloak)      pattern='kc\.sh|keycloak|quarkus' ;;
    elasticsearch) pattern='elasticsearch' ;;
    es_proxy)      pattern='nginx' ;;
    postgres)      pattern='postgres' ;;
  esac
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -Eq "$pattern" || return 1
  printf '%s\n' "$pid"
}

# stop_pid COMPONENT TIMEOUT : SIGTERM the recorded pid, SIGKILL its process group after TIMEOUT
stop_pid() {
  local comp=$1 timeout=${2:-30} pid
  if ! pid=$(pid_of "$comp"); then
    rm -f "$(pidfile "$comp")"
    return 0
  fi
  log "$comp: stopping pid $pid"
  kill -TERM "$pid" 2>/dev/null || true
  local deadline=$(( $(now) + timeout ))
  while kill -0 "$pid" 2>/dev/null && (( $(now) < deadline )); do sleep 1; done
  if kill -0 "$pid" 2>/dev/null; then
    warn "$comp: pid $pid still alive after ${timeout}s, sending SIGKILL to its process group"
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    sleep 1
  fi
  rm -f "$(pidfile "$comp")"
}

# spawn COMPONENT LOGFILE CMD... : start CMD detached (own session) as the stack user, record its pid.
# setsid does not fork here (a background job of a non-interactive shell is no group leader), and
# setpriv/env exec, so $! is the server's own pid.
spawn() {
  local comp=$1 logf=$2; shift 2
  server_log "$logf"
  printf '\n===== %s: starting %s =====\n' "$(date -Is)" "$comp" >>"$logf"
  setsid "${RUN_AS[@]}" "$@" >>"$logf" 2>&1 </dev/null 9>&- &
  printf '%s\n' "$!" >"$(pidfile "$comp")"
}

# check_port_free COMPONENT PORT : fail clearly when a foreign process holds our port
check_port_free() {
  local comp=$1 port=$2
  if port_open "$port"; then
    die "$comp: port $port on $BIND is already in use by a process this stack did not start (another stack dir? a system service, e.g. the Debian '$comp' service?). Stop it first."
  fi
}

# ---------------------------------------------------------------------------------------------
# set-up: packages, user, directories, java, downloads, secrets

need_cmd() { command -v "$1" >/dev/null 2>&1; }

# ensure_packages PKG... : install missing Debian packages (apt-get update only when something is missing)
ensure_packages() {
  local missing=() p
  for p in "$@"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  local SUDO=()
  if ! is_root; then
    need_cmd sudo || die "missing packages (${missing[*]}) and not root: install them first"
    SUDO=(sudo)
  fi
  log "installing Debian packages: ${missing[*]}"
  # Keep the packaged services (orthanc, postgresql 'main' cluster) from starting on install:
  # this stack runs its own instances on its own ports.
  local made_policy=
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee /usr/sbin/policy-rc.d >/dev/null
    "${SUDO[@]}" chmod 0755 /usr/sbin/policy-rc.d
    made_policy=1
  fi
  local rc=0
  umask 022  # packages install system files for everybody; the stack's own files stay 077 (restored below)
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q || rc=$?
  if [[ $rc -eq 0 ]]; then
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" || rc=$?
  fi
  [[ -n $made_policy ]] && "${SUDO[@]}" rm -f /usr/sbin/policy-rc.d
  umask 077
  [[ $rc -eq 0 ]] || die "apt-get failed (exit $rc) installing: ${missing[*]}"
}

packages_for_components() {
  local pkgs="$DEBIAN_PACKAGES_BASE" c
  [[ $PHI_VOLUME == none ]] || pkgs+=" $DEBIAN_PACKAGES_VOLUME"
  for c in "$@"; do
    case $c in
      orthanc)  pkgs+=" $DEBIAN_PACKAGES_ORTHANC" ;;
      postgres) pkgs+=" $DEBIAN_PACKAGES_POSTGRES" ;;
      keycloak|elasticsearch) need_cmd mvn || pkgs+=" $DEBIAN_PACKAGES_MAVEN" ;;
    esac
  done
  printf '%s\n' "$pkgs"
}

ensure_user() {
  is_root || { STACK_USER=$(id -un); return 0; }
  if ! id -u "$STACK_USER" >/dev/null 2>&1; then
    log "creating system user $STACK_USER"
    useradd --system --user-group --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin --comment "compliance local stack" "$STACK_USER"
  fi
}

# stack_init : directories with the ownership model described in README.md
stack_init() {
  ensure_user
  set_run_as
  # Everything the stack and its servers write is private to its writer (see "Permissions" below).
  umask 077
  mkdir -p "$STACK" "$STACK/logs" "$STACK/run" "$STACK/home"
  if is_root; then
    chown "root:$STACK_USER" "$STACK" "$STACK/logs"; chmod 0750 "$STACK" "$STACK/logs"
    if [[ -d $STACK/dist ]]; then share_with_stack "$STACK/dist"; fi
  else
    chmod 0700 "$STACK" "$STACK/logs"
  fi
  chmod 0700 "$STACK/run"
  own "$STACK/home"; chmod 0700 "$STACK/home"
  if is_root; then
    # the unprivileged user must be able to reach into the stack dir
    if ! run_as test -x "$STACK/logs"; then
      die "user $STACK_USER cannot traverse into $STACK (a parent directory is not world-executable); choose another COMPLIANCE_STACK_DIR or chmod o+x the parents"
    fi
  fi
}

# The lock lives on fd 9; every server is started with 9>&- so none of them inherits (and holds) it.
lock_stack() {
  exec 9>"$STACK/run/stack.lock"
  if ! flock -w 900 9; then die "another up/down holds $STACK/run/stack.lock"; fi
}

# find_java : JAVA_HOME for the newest JDK >= JAVA_MIN_VERSION (COMPLIANCE_JAVA_HOME wins)
find_java() {
  if [[ -n ${COMPLIANCE_JAVA_HOME:-} ]]; then JAVA_HOME_21=$COMPLIANCE_JAVA_HOME; return 0; fi
  local best= best_v=0 d v
  for d in /usr/lib/jvm/*/; do
    d=${d%/}
    [[ -L $d ]] && continue
    [[ -x $d/bin/java ]] || continue
    v=
    if [[ -r $d/release ]]; then
      v=$(sed -n 's/^JAVA_VERSION="\([0-9]*\).*/\1/p' "$d/release")
    fi
    if [[ -z $v ]]; then
      v=$("$d/bin/java" -version 2>&1 | sed -n '1s/.*version "\([0-9]*\).*/\1/p')
    fi
    [[ $v =~ ^[0-9]+$ ]] || continue
    if (( v >= JAVA_MIN_VERSION && v > best_v )); then best=$d; best_v=$v; fi
  done
  [[ -n $best ]] || die "no JDK >= $JAVA_MIN_VERSION under /usr/lib/jvm (Keycloak 26 and Elasticsearch 9 need it); install one or set COMPLIANCE_JAVA_HOME"
  JAVA_HOME_21=$best
}

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

# fetch_artifact ARTIFACT FILE SHA256 -> prints the verified path in $CACHE/downloads
fetch_artifact() {
  local artifact=$1 file=$2 sha=$3 dir="$CACHE/downloads"
  mkdir -p "$dir"
  local path="$dir/$file"
  if [[ -f $path ]] && [[ $(sha256_of "$path") == "$sha" ]]; then
    printf '%s\n' "$path"; return 0
  fi
  rm -f "$path"
  log "downloading $artifact"
  # Maven resolves the artifact through the machine's configured repositories (and ~/.m2);
  # the project never downloads by URL.
  need_cmd mvn || die "Maven (mvn) is needed to fetch $artifact: apt-get install maven"
  local out
  if ! out=$(cd "$dir" && mvn -q -B -Dstyle.color=never dependency:copy \
               "-Dartifact=$artifact" "-DoutputDirectory=$dir" 2>&1); then
    printf '%s\n' "$out" | tail -n 20 >&2
    die "mvn dependency:copy failed for $artifact"
  fi
  [[ -f $path ]] || die "mvn dependency:copy did not produce $path"
  local got; got=$(sha256_of "$path")
  if [[ $got != "$sha" ]]; then
    mv "$path" "$path.bad"
    die "checksum mismatch for $file: expected $sha, got $got (kept as $path.bad)"
  fi
  log "verified $file sha256 $sha"
  printf '%s\n' "$path"
}

gen_secret() {
  if need_cmd openssl; then openssl rand -hex 24
  else python3 -c 'import secrets; print(secrets.token_hex(24))'; fi
}

SECRET_KEYS=(ORTHANC_GATEWAY_PASSWORD OIDC_CLIENT_SECRET KEYCLOAK_ADMIN_PASSWORD POSTGRES_PASSWORD FRONT_SECRET
             ES_PROXY_PASSWORD ES_PROXY_API_KEY_SECRET)

# ensure_secrets : generate missing secrets once into $STACK/secrets.env (0600), then load them
ensure_secrets() {
  local f="$STACK/secrets.env" k
  ( umask 077; touch "$f" )
  chmod 0600 "$f"
  for k in "${SECRET_KEYS[@]}"; do
    if ! grep -q "^$k=" "$f"; then
      printf '%s=%s\n' "$k" "$(gen_secret)" >>"$f"
    fi
  done
  # The archive's patient index key (HMAC of patient ids in the archive key table; 32 bytes, hex),
  # generated once, passed to Orthanc's storage plugin by environment only (compliance/archive/keystore.py).
  if ! grep -q '^ARCHIVE_PATIENT_INDEX_KEY=' "$f"; then
    printf 'ARCHIVE_PATIENT_INDEX_KEY=%s\n' "$(openssl rand -hex 32 2>/dev/null || python3 -c 'import secrets; print(secrets.token_hex(32))')" >>"$f"
  fi
  # The Ed25519 key that signs audit checkpoints (compliance/audit/checkpoints.py), generated once.
  local ck="$STACK/audit-checkpoint-ed25519.pem"
  [[ -s $ck ]] || ( umask 077; openssl genpkey -algorithm ed25519 -out "$ck" ) || die "cannot generate $ck"
  chmod 0600 "$ck"
  load_secrets
}

load_secrets() {
  local f="$STACK/secrets.env" k v
  [[ -r $f ]] || return 1
  while IFS='=' read -r k v; do
    [[ $k =~ ^[A-Z_][A-Z0-9_]*$ ]] || continue
    printf -v "SECRET_$k" '%s' "$v"
  done <"$f"
}

write_gateway_env() {
  local f="$STACK/gateway.env" tmp
  tmp=$(umask 077; mktemp "$STACK/.gateway.env.XXXXXX")
  # development: the settings default to production and its safeguards (https, no placeholder secrets)
  cat >"$tmp" <<EOF
COMPLIANCE_ENVIRONMENT=development
COMPLIANCE_ARCHIVE_URL=http://$BIND:$ORTHANC_PORT
COMPLIANCE_ARCHIVE_USERNAME=gateway
COMPLIANCE_ARCHIVE_PASSWORD=$SECRET_ORTHANC_GATEWAY_PASSWORD
COMPLIANCE_OIDC_ISSUER=http://$BIND:$KEYCLOAK_PORT/realms/imaging
COMPLIANCE_OIDC_AUDIENCE=compliance-gateway
COMPLIANCE_OIDC_CLIENT_SECRET=$SECRET_OIDC_CLIENT_SECRET
COMPLIANCE_FRONT_SECRET=$SECRET_FRONT_SECRET
COMPLIANCE_KEYCLOAK_URL=http://$BIND:$KEYCLOAK_PORT
COMPLIANCE_ELASTICSEARCH_URL=http://$BIND:$ELASTICSEARCH_PORT
COMPLIANCE_ELASTICSEARCH_SECURE_URL=$(es_proxy_url)
COMPLIANCE_ELASTICSEARCH_SECURE_CA_FILE=$(es_proxy_dir)/tls/ca.pem
COMPLIANCE_ELASTICSEARCH_SECURE_API_KEY=$(es_proxy_api_key)
COMPLIANCE_ELASTICSEARCH_SECURE_USERNAME=$ES_PROXY_USER
COMPLIANCE_ELASTICSEARCH_SECURE_PASSWORD=$SECRET_ES_PROXY_PASSWORD
COMPLIANCE_ELASTICSEARCH_SECURE_CLIENT_CERT_FILE=$(es_proxy_dir)/tls/client.pem
COMPLIANCE_ELASTICSEARCH_SECURE_CLIENT_KEY_FILE=$(es_proxy_dir)/tls/client.key
COMPLIANCE_POSTGRES_URL=postgresql+psycopg://compliance:$SECRET_POSTGRES_PASSWORD@$BIND:$POSTGRES_PORT/compliance
COMPLIANCE_ARCHIVE_ENCRYPTED=$( [[ -n $(orthanc_plugin_script) ]] && echo true || echo false )
EOF
  # on its encrypted volume: the gateway's SQLite database (audit outbox)
  phi_on_volume && printf 'COMPLIANCE_DATABASE_URL=sqlite:///%s/compliance.db\n' "$PHI_GATEWAY" >>"$tmp"
  chmod 0600 "$tmp"
  if [[ -f $f ]] && cmp -s "$tmp" "$f"; then rm -f "$tmp"; else mv -f "$tmp" "$f"; fi
}

# ---------------------------------------------------------------------------------------------
# Permissions: everything the stack writes is private to the account that runs that server (umask 077,
# directories 0700, files 0600). Where one account must read what another wrote, the file is shared
# with the stack user's own group (created with it, nobody else in it), never with other users:
#   $STACK, logs/, the encrypted volume's root     root:stack-group 0750 (the servers reach into them)
#   orthanc/orthanc.json, the storage shim          root:stack-group 0640/0750 (Orthanc reads, root writes)
#   dist/ (the Elasticsearch home, when here)        root:stack-group, read-only for the group
# The gateway and its nginx front run as root and read only root's files (gateway.env, the checkpoint
# key); Orthanc's storage plugin reads the archive key store as its owner, the stack user.

# share_with_stack PATH... : root's files the stack user must read (recursively: group read, no write)
share_with_stack() {
  if is_root; then
    chown -R "root:$STACK_USER" "$@"
    chmod -R u+rwX,g+rX,g-w,o-rwx "$@"
  else
    chmod -R go-rwx "$@"
  fi
}

# server_log FILE : a server's log, owned by the account that runs it, 0600
server_log() {
  [[ -e $1 ]] || ( umask 077; : >>"$1" )
  own "$1"; chmod 0600 "$1"
}

# stack_permissions_repair : every path under $STACK (the encrypted volume's mount included) that
# another local user could read, write or enter is closed, and each is named in one log line. Files are
# owner-only; group bits stay only on root's files shared with the stack user's own group (above).
# gocryptfs.diriv files of the ciphertext directory are public per-directory IVs that gocryptfs makes
# 0444 inside 0700 directories: left alone.
stack_permissions_repair() {
  local shared='' line mode owner group path rel new fixed=() n=0
  is_root && shared="root:$STACK_USER"
  while IFS=$'\t' read -r -d '' mode owner group path; do
    mode=$(( 8#$mode ))
    new=$(( mode & ~8#007 ))
    [[ $owner:$group == "$shared" ]] || new=$(( new & ~8#070 ))
    (( new == mode )) && continue
    chmod "$(printf '%04o' "$new")" -- "$path" 2>/dev/null || { warn "permissions: cannot chmod $path"; continue; }
    rel=${path#"$STACK"/}
    n=$(( n + 1 ))
    (( n <= 40 )) && fixed+=("$rel ($(printf '%04o' "$mode")->$(printf '%04o' "$new"))")
  done < <(find "$STACK" \( -path "$PHI_CIPHER/*" -name gocryptfs.diriv \) -prune -o ! -type l -perm /077 \
             -printf '%m\t%u\t%g\t%p\0' 2>/dev/null)
  (( n == 0 )) && return 0
  line="permissions: repaired $n path(s) other local users could open: ${fixed[*]}"
  (( n > 40 )) && line+=" (and $(( n - 40 )) more)"
  log "$line"
}

# ---------------------------------------------------------------------------------------------
# The encrypted volumes: every store that holds PHI outside the (already encrypted) DICOM objects is on
# a gocryptfs volume (Debian gocryptfs, FUSE):
#   phi          $STACK/phi (ciphertext $STACK/phi-encrypted): Orthanc's index and temporary files,
#                PostgreSQL's and Elasticsearch's data. Mounted by the stack user, who owns every file
#                on it; -allow_other lets root's maintenance (up, the tests) in and makes the kernel check
#                every file's owner and mode (default_permissions): other users stay out.
#   phi-gateway  $STACK/phi-gateway (ciphertext $STACK/phi-gateway-encrypted): the gateway's SQLite
#                database (audit outbox). Root's, mounted by root for root alone.
# Not one volume mounted by root with -allow_other: gocryptfs 2.3 (Debian 12) then switches thread
# credentials for each request, racily, and creating files fails at random with "Operation not
# permitted" (rfjakob/gocryptfs#892; seen here on Elasticsearch's segment files). A volume mounted by
# its only writer never switches. The stack user mounts through fusermount3, which opens /dev/fuse as
# that user: as root, `up` gives /dev/fuse to the stack user's group (0660; Debian's default is 0666)
# and enables user_allow_other in /etc/fuse.conf.
# Passwords: data keys of the archive's key store (compliance/archive/volume.py), wrapped by the active
# KEK of the archive's provider (local keyring or PKCS#11), rewrapped by `keys rewrap`, gone with that
# KEK. An unmounted mountpoint is root's, mode 0000 and immutable (chattr +i): nothing can write
# plaintext into it by mistake. `down` (the whole stack) unmounts both; `up` mounts them when they are not.
# COMPLIANCE_PHI_VOLUME=none keeps the stores in plaintext under $STACK (development of other parts only).

PHI_VOLUME=${COMPLIANCE_PHI_VOLUME:-gocryptfs}
PHI="$STACK/phi"
PHI_CIPHER="$STACK/phi-encrypted"
PHI_GATEWAY="$STACK/phi-gateway"
VOLUMES=(phi phi-gateway)
# stores (paths relative to $STACK without the volume, to $PHI with it); the gateway's database is
# compliance.db beside them without the volume, at the root of phi-gateway with it
PHI_STORES=(orthanc/index-encrypted orthanc/index orthanc/storage elasticsearch/data postgres/data)
PHI_LAYOUT=

volume_logs() { printf '%s\n' "$STACK/logs/volume.log"; }

# phi_layout : PHI_LAYOUT=volume when the stack has its encrypted volumes, plain otherwise
phi_layout() {
  if [[ -f $PHI_CIPHER/gocryptfs.conf ]]; then PHI_LAYOUT=volume; else PHI_LAYOUT=plain; fi
}

# phi_dir REL : where a PHI store lives in this stack's layout
phi_dir() {
  [[ -n $PHI_LAYOUT ]] || phi_layout
  if [[ $PHI_LAYOUT == volume ]]; then printf '%s/%s\n' "$PHI" "$1"; else printf '%s/%s\n' "$STACK" "$1"; fi
}

phi_on_volume() { [[ -n $PHI_LAYOUT ]] || phi_layout; [[ $PHI_LAYOUT == volume ]]; }

phi_legacy_present() {
  local rel
  for rel in "${PHI_STORES[@]}" compliance.db; do [[ -e $STACK/$rel ]] && return 0; done
  return 1
}

# phi_stores_in_use : a server of the plaintext layout is running (its files cannot be moved under it)
phi_stores_in_use() {
  local c pid
  postgres_sync_pid 2>/dev/null || true
  for c in orthanc elasticsearch postgres; do pid_of "$c" >/dev/null 2>&1 && return 0; done
  pid=$(cat "$STACK/run/gateway.pid" 2>/dev/null || true)
  [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null
}

# volume NAME: its mountpoint, ciphertext directory, and whether the stack user mounts it
volume_mnt()    { printf '%s/%s\n' "$STACK" "$1"; }
volume_cipher() { printf '%s/%s-encrypted\n' "$STACK" "$1"; }
volume_of_stack_user() { [[ $1 == phi ]] && is_root; }
# run as the volume's owner: gocryptfs and anything that must create its files
as_volume_owner() { local name=$1; shift; if volume_of_stack_user "$name"; then run_as "$@"; else "$@"; fi; }

volume_mounted() { findmnt -rn --mountpoint "$(volume_mnt "$1")" >/dev/null 2>&1; }

# volume_password NAME [--create] : its password on stdout, from the archive's key store (as its owner)
volume_password() {
  local name=$1; shift
  ( orthanc_keys_env
    cd "$STACK/home"
    run_as env "PYTHONPATH=$CHECKOUT:$CHECKOUT/.venv/lib/python3.11/site-packages" \
      /usr/bin/python3 -m compliance.archive.volume password "$name" "$@" 2>>"$(volume_logs)" 9>&- )
}

# fuse_for_stack_user : /dev/fuse for the stack user's group, user_allow_other (root only; logged when changed)
fuse_for_stack_user() {
  is_root || return 0
  [[ -e /dev/fuse ]] || die "volume: /dev/fuse is missing (no FUSE in this machine or container): the encrypted volumes cannot be mounted; COMPLIANCE_PHI_VOLUME=none runs the stores in plaintext (development only)"
  if ! run_as test -r /dev/fuse -a -w /dev/fuse; then
    chgrp "$STACK_USER" /dev/fuse && chmod 0660 /dev/fuse || die "volume: cannot give /dev/fuse to the group $STACK_USER"
    log "volume: /dev/fuse is now root:$STACK_USER 0660 (the stack user mounts its volume through fusermount3)"
  fi
  if ! grep -qE '^[[:space:]]*user_allow_other' /etc/fuse.conf 2>/dev/null; then
    printf '# deploy/local (compliance stack): the stack user mounts its volume with -allow_other\nuser_allow_other\n' >>/etc/fuse.conf
    log "volume: enabled user_allow_other in /etc/fuse.conf"
  fi
}

# mountpoint_guard NAME on|off : an unmounted mountpoint takes no file (root's, 0000, immutable); before
# the stack user mounts on it, it is theirs (fusermount3 wants write access to it)
mountpoint_guard() {
  local mnt; mnt=$(volume_mnt "$1")
  [[ -d $mnt ]] || mkdir -m 0700 "$mnt"
  is_root || return 0
  if [[ $2 == on ]]; then
    [[ -z $(ls -A "$mnt") ]] || die "volume: $mnt is not mounted but holds files (written while unmounted?): move them away"
    chattr -i "$mnt" 2>/dev/null || true
    chown root:root "$mnt"; chmod 0000 "$mnt"
    chattr +i "$mnt" 2>/dev/null || warn "volume: cannot make the mountpoint $mnt immutable (chattr +i)"
  elif volume_of_stack_user "$1"; then
    chattr -i "$mnt" 2>/dev/null || true
    chown "$STACK_USER:$STACK_USER" "$mnt"; chmod 0700 "$mnt"
  fi
}

volume_create() {
  local name=$1 logf cipher; logf=$(volume_logs); cipher=$(volume_cipher "$name")
  if [[ -d $cipher ]] && ! rmdir "$cipher" 2>/dev/null; then
    die "volume: $cipher exists without gocryptfs.conf and is not empty; move it away (it cannot be decrypted without that file)"
  fi
  mkdir -m 0700 "$cipher"
  volume_of_stack_user "$name" && own "$cipher"
  printf '\n===== %s: gocryptfs -init %s =====\n' "$(date -Is)" "$cipher" >>"$logf"
  if ! volume_password "$name" --create | as_volume_owner "$name" gocryptfs -init -q -- "$cipher" >>"$logf" 2>&1 9>&-; then
    rm -rf "$cipher"
    show_logs "$logf"; die "volume: cannot create the encrypted volume $name in $cipher"
  fi
  log "volume: created the encrypted volume $name ($cipher; its password a data key of the archive's key store)"
}

# volume_mount NAME : mount it unless it is (idempotent); a dead mount is replaced
volume_mount() {
  local name=$1 logf mnt cipher; logf=$(volume_logs); mnt=$(volume_mnt "$name"); cipher=$(volume_cipher "$name")
  if volume_mounted "$name"; then
    [[ $(findmnt -rn -o FSTYPE --mountpoint "$mnt") == fuse.gocryptfs ]] || die "volume: something other than gocryptfs is mounted on $mnt"
    if stat "$mnt/." >/dev/null 2>&1; then return 0; fi
    warn "volume: $mnt is mounted but does not answer (gocryptfs died?): unmounting it"
    fusermount3 -u -z "$mnt" 2>/dev/null || umount -l "$mnt" || die "volume: cannot unmount the dead $mnt"
  fi
  [[ -f $cipher/gocryptfs.conf ]] || volume_create "$name"
  mountpoint_guard "$name" off
  local opts=(-q -nosyslog)
  volume_of_stack_user "$name" && opts+=(-allow_other)  # root's maintenance; the kernel checks owner and mode
  printf '\n===== %s: mounting %s on %s =====\n' "$(date -Is)" "$cipher" "$mnt" >>"$logf"
  if ! volume_password "$name" | as_volume_owner "$name" gocryptfs "${opts[@]}" -- "$cipher" "$mnt" >>"$logf" 2>&1 9>&-; then
    mountpoint_guard "$name" on
    show_logs "$logf"; die "volume: cannot mount $cipher on $mnt"
  fi
  volume_mounted "$name" || die "volume: gocryptfs exited without mounting $mnt"
  log "volume: mounted the encrypted volume $name on $mnt"
}

volume_unmount() {
  local name=$1 mnt; mnt=$(volume_mnt "$name")
  volume_mounted "$name" || return 0
  if fusermount3 -u "$mnt" 2>/dev/null || umount "$mnt" 2>/dev/null; then
    mountpoint_guard "$name" on
    log "volume: unmounted $mnt"
  else
    warn "volume: $mnt is still in use, left mounted (a gateway, a test, a shell in it?)"
  fi
}

phi_volumes_unmount() {
  phi_layout
  [[ $PHI_LAYOUT == volume ]] || return 0
  local name
  for name in "${VOLUMES[@]}"; do volume_unmount "$name"; done
}

# phi_volume_dirs : the top directories of phi, each owned by the server that writes there
phi_volume_dirs() {
  chmod 0700 "$PHI" "$PHI_GATEWAY"
  local d
  for d in orthanc elasticsearch postgres; do
    [[ -d $PHI/$d ]] || { mkdir -m 0700 "$PHI/$d"; own "$PHI/$d"; }
  done
}

# phi_move SRC DST : a plaintext store into the volume; the copy is renamed into place only once whole,
# so an interrupted move is redone from the start (a DST that exists is a finished copy)
phi_move() {
  local src=$1 dst=$2
  [[ -e $src ]] || return 0
  if [[ ! -e $dst ]]; then
    rm -rf "$dst.migrating"
    cp -a "$src" "$dst.migrating" || { rm -rf "$dst.migrating"; die "volume: copying $src into the volume failed; nothing was removed"; }
    mv "$dst.migrating" "$dst"
  fi
  rm -rf "$src"
}

# phi_migrate : a stack made before the volumes (plaintext stores under $STACK), every server of it down
phi_migrate() {
  local rel moved=() f
  for rel in "${PHI_STORES[@]}"; do
    [[ -e $STACK/$rel ]] || continue
    phi_move "$STACK/$rel" "$PHI/$rel"
    moved+=("$rel")
  done
  if [[ -e $STACK/compliance.db ]]; then
    # the gateway's database with its WAL: copied together, the database renamed into place last
    if [[ ! -e $PHI_GATEWAY/compliance.db ]]; then
      rm -rf "$PHI_GATEWAY/.migrating"; mkdir -m 0700 "$PHI_GATEWAY/.migrating"
      for f in "$STACK"/compliance.db "$STACK"/compliance.db-wal "$STACK"/compliance.db-shm; do
        [[ -e $f ]] && { cp -a "$f" "$PHI_GATEWAY/.migrating/" || die "volume: copying $f into the volume failed"; }
      done
      for f in compliance.db-wal compliance.db-shm compliance.db; do
        [[ -e $PHI_GATEWAY/.migrating/$f ]] && mv "$PHI_GATEWAY/.migrating/$f" "$PHI_GATEWAY/$f"
      done
      rmdir "$PHI_GATEWAY/.migrating"
    fi
    rm -f "$STACK"/compliance.db "$STACK"/compliance.db-wal "$STACK"/compliance.db-shm
    moved+=(compliance.db)
  fi
  rm -rf "$STACK/orthanc/tmp"  # Orthanc's temporary files: nothing to keep
  (( ${#moved[@]} )) || return 0
  log "volume: moved the plaintext stores ${moved[*]} into the encrypted volumes; the plaintext copies were deleted, not wiped (their blocks stay on the disk until reused)"
}

# phi_volume_up : the volumes of a new stack are created; a stack made before them is migrated when none
# of its servers runs (else it keeps running in plaintext, with a warning naming what to do); mounted.
phi_volume_up() {
  phi_layout
  if [[ $PHI_VOLUME == none ]]; then
    [[ $PHI_LAYOUT == volume ]] && die "volume: COMPLIANCE_PHI_VOLUME=none, but this stack's stores are on the encrypted volume ($PHI_CIPHER): unset it"
    warn "volume: COMPLIANCE_PHI_VOLUME=none: Orthanc's index, the audit outbox, PostgreSQL and Elasticsearch keep PHI in plaintext under $STACK (development only)"
    return 0
  fi
  [[ $PHI_VOLUME == gocryptfs ]] || die "volume: COMPLIANCE_PHI_VOLUME must be gocryptfs or none, not '$PHI_VOLUME'"
  if [[ $PHI_LAYOUT == plain ]] && phi_legacy_present && phi_stores_in_use; then
    warn "volume: this stack was made before the encrypted volumes: Orthanc's index, the audit outbox, PostgreSQL and Elasticsearch keep PHI in plaintext under $STACK while its servers run. To move them into the encrypted volumes: deploy/local/down && deploy/local/up (the stores are moved, nothing is lost)"
    return 0
  fi
  case ${COMPLIANCE_ARCHIVE_KEYS_DATABASE_URL:-} in
    *"@$BIND:$POSTGRES_PORT/"*|*"@localhost:$POSTGRES_PORT/"*)
      die "volume: COMPLIANCE_ARCHIVE_KEYS_DATABASE_URL names this stack's PostgreSQL, whose data is on the encrypted volume: the volumes' keys cannot be kept there" ;;
  esac
  fuse_for_stack_user
  mkdir -p "$STACK/orthanc"; chmod 0700 "$STACK/orthanc"
  if is_root; then chown "$STACK_USER:$STACK_USER" "$STACK/orthanc"; fi
  orthanc_key_store_up  # the archive's key store holds the volumes' keys too
  local name
  for name in "${VOLUMES[@]}"; do volume_mount "$name"; done
  PHI_LAYOUT=volume
  phi_volume_dirs
  if phi_legacy_present; then
    if phi_stores_in_use; then
      warn "volume: plaintext stores remain under $STACK while servers run; deploy/local/down && deploy/local/up moves them"
    else
      phi_migrate
    fi
  fi
}

# ---------------------------------------------------------------------------------------------
# Orthanc

orthanc_url()  { printf 'http://%s:%s\n' "$BIND" "$ORTHANC_PORT"; }

# The encrypted storage-area plugin (compliance/archive/orthanc_plugin.py) is on by default;
# COMPLIANCE_ORTHANC_PYTHON_PLUGIN=none runs a plaintext archive (development of other parts only),
# any other value names another plugin script.
orthanc_plugin_script() {
  local s=${COMPLIANCE_ORTHANC_PYTHON_PLUGIN-$CHECKOUT/compliance/archive/orthanc_plugin.py}
  [[ $s == none ]] && s=
  printf '%s\n' "$s"
}

# The archive's key store (compliance/archive/keystore.py), created as the stack user before Orthanc
# starts: $STACK/archive-keys/ (0700) with the keyring (0600) and the key database, first KEK.
# Debian's python3 (the one Orthanc embeds) runs it with the checkout and the venv's site-packages.
orthanc_keys_env() {
  export COMPLIANCE_ENVIRONMENT=development  # the plugin's Settings() reads no gateway.env
  export COMPLIANCE_STACK_DIR="$STACK"
  export COMPLIANCE_ARCHIVE_PATIENT_INDEX_KEY="$SECRET_ARCHIVE_PATIENT_INDEX_KEY"
}

orthanc_key_store_up() {
  local keys="$STACK/archive-keys"
  mkdir -p "$keys"; chmod 0700 "$keys"; own "$keys"
  ( orthanc_keys_env
    cd "$STACK/orthanc"
    run_as env "PYTHONPATH=$CHECKOUT:$CHECKOUT/.venv/lib/python3.11/site-packages" \
      /usr/bin/python3 -m compliance.archive.keystore_setup ) >>"$(orthanc_logs)" 2>&1 \
    || { show_logs "$(orthanc_logs)"; die "orthanc: cannot set up the archive key store in $keys"; }
  log "orthanc: archive key store ready in $keys"
}
orthanc_logs() { printf '%s\n' "$STACK/logs/orthanc.log"; }
# Orthanc's index and temporary files (the encrypted archive's storage stays in $STACK/orthanc)
orthanc_phi_dir() { phi_dir orthanc; }

# The storage shim (deploy/orthanc/compliance_storage_shim.c): Orthanc's storage area with range
# reads, served by the Python storage; built here when its source is newer. Without it (no compiler
# or headers) the Python plugin registers its own whole-file storage area: still encrypted, but two
# files per instance.
orthanc_shim() { printf '%s\n' "$STACK/orthanc/libComplianceStorageShim.so"; }
orthanc_shim_build() {
  local src="$DEPLOY_DIR/orthanc/compliance_storage_shim.c" out; out=$(orthanc_shim)
  # root's file that Orthanc (the stack user) loads: shared with the stack user's group only
  [[ -f $out && $out -nt $src ]] && { share_with_stack "$out"; return 0; }
  if ! need_cmd gcc || [[ ! -f /usr/include/orthanc/OrthancCPlugin.h || ! -f /usr/include/python3.11/Python.h ]]; then
    rm -f "$out"
    log "orthanc: storage shim not built (gcc, orthanc-dev or python3.11-dev missing): two files per instance"
    return 0
  fi
  gcc -O2 -Wall -shared -fPIC -o "$out.tmp" "$src" -I/usr/include/python3.11 \
      /usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0 >>"$(orthanc_logs)" 2>&1 \
    || { rm -f "$out.tmp"; show_logs "$(orthanc_logs)"; die "orthanc: cannot build the storage shim"; }
  share_with_stack "$out.tmp"; mv -f "$out.tmp" "$out"
  log "orthanc: storage shim built ($out)"
}

orthanc_healthy() {
  load_secrets || return 1
  curl -fsS -m 5 -o /dev/null -u "gateway:$SECRET_ORTHANC_GATEWAY_PASSWORD" "$(orthanc_url)/system"
}

# render_orthanc_config OUT : template deploy/orthanc/orthanc.json -> OUT, with the plugin hook
render_orthanc_config() {
  local out=$1
  STACK_ORTHANC_DIR="$STACK/orthanc" ORTHANC_PORT="$ORTHANC_PORT" ORTHANC_PHI_DIR="$(orthanc_phi_dir)" \
  ORTHANC_GATEWAY_PASSWORD="$SECRET_ORTHANC_GATEWAY_PASSWORD" \
  PYTHON_PLUGIN="$(orthanc_plugin_script)" \
  STORAGE_SHIM="$(orthanc_shim)" \
  CODE_STAMP="$(code_stamp "$CHECKOUT" "$(orthanc_shim)")" \
  python3 - "$DEPLOY_DIR/orthanc/orthanc.json" "$out" <<'PY'
import json, os, sys
src, out = sys.argv[1], sys.argv[2]
subst = {"@STACK_ORTHANC_DIR@": os.environ["STACK_ORTHANC_DIR"],
         "@ORTHANC_GATEWAY_PASSWORD@": os.environ["ORTHANC_GATEWAY_PASSWORD"]}
def fill(v):
    if isinstance(v, str):
        for k, r in subst.items():
            v = v.replace(k, r)
        return v
    if isinstance(v, list):
        return [fill(x) for x in v]
    if isinstance(v, dict):
        return {k: fill(x) for k, x in v.items()}
    return v
cfg = fill(json.load(open(src)))
cfg["HttpPort"] = int(os.environ["ORTHANC_PORT"])  # the template's 8042 unless COMPLIANCE_ORTHANC_PORT
# The index (patient names and ids), temporary files and a plaintext archive: on the encrypted volume
phi = os.environ["ORTHANC_PHI_DIR"]
if phi != os.environ["STACK_ORTHANC_DIR"]:
    cfg["StorageDirectory"], cfg["IndexDirectory"] = phi + "/storage", phi + "/index"
    cfg["TemporaryDirectory"] = phi + "/tmp"
# ---- HOOK: storage-area plugin (orthanc-python). Enabled only by COMPLIANCE_ORTHANC_PYTHON_PLUGIN.
script = os.environ.get("PYTHON_PLUGIN", "")
if script:
    script = os.path.abspath(script)
    if not os.path.isfile(script):
        sys.exit(f"COMPLIANCE_ORTHANC_PYTHON_PLUGIN={script}: no such file")
    shim = os.environ.get("STORAGE_SHIM", "")
    if shim and os.path.isfile(shim):
        cfg["Plugins"].append(shim)  # before the Python plugin: see compliance_storage_shim.c
    cfg["Plugins"].append("/usr/share/orthanc/plugins/libOrthancPython.so")
    cfg["PythonScript"] = script
    cfg["PythonVerbose"] = False
    # Encrypted archive: its own state directories (a plaintext archive's files are never mixed in),
    # and no in-memory storage cache, so a shredded or corrupted file is never served from memory.
    base = os.environ["STACK_ORTHANC_DIR"]
    cfg["StorageDirectory"] = base + "/storage-encrypted"
    cfg["IndexDirectory"] = phi + "/index-encrypted"
    cfg["MaximumStorageCacheSize"] = 0
    # The storage plugin runs this checkout's code, loaded at start: a new stamp (the code changed)
    # changes the configuration, and orthanc_up restarts Orthanc. Orthanc ignores the key.
    cfg["ComplianceCodeStamp"] = os.environ.get("CODE_STAMP", "")
# ---- end of hook
with open(out, "w") as f:
    json.dump(cfg, f, indent=2)
    f.write("\n")
PY
}

# The integration test of a refused store makes the storage directories immutable (chattr +i) and
# undoes it when it ends; a test run killed in between would leave an archive that refuses every write.
orthanc_storage_writable() {
  local root=$1
  [[ -d $root ]] && command -v lsattr >/dev/null || return 0
  local flags; flags=$(lsattr -d "$root" 2>/dev/null | cut -d' ' -f1) || return 0
  [[ $flags == *i* ]] || return 0
  log "orthanc: $root was left immutable (an interrupted test?); making it writable again"
  find "$root" -type d -exec chattr -i {} + || die "orthanc: cannot clear the immutable flag on $root"
}

orthanc_up() {
  local dir="$STACK/orthanc" conf="$STACK/orthanc/orthanc.json" logf
  logf=$(orthanc_logs)
  [[ -x /usr/sbin/Orthanc ]] || die "orthanc: /usr/sbin/Orthanc missing"
  [[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]] || die "orthanc: DICOMweb plugin missing"
  local plugin phi; plugin=$(orthanc_plugin_script); phi=$(orthanc_phi_dir)
  if [[ -n $plugin ]]; then
    mkdir -p "$dir/storage-encrypted" "$phi/index-encrypted" "$phi/tmp"
  else
    mkdir -p "$phi/storage" "$phi/index" "$phi/tmp"
  fi
  orthanc_storage_writable "$dir/storage-encrypted"
  own "$dir" "$phi"; chmod 0700 "$dir" "$phi"
  # root's configuration (it holds the gateway's password), read by Orthanc through the stack user's group
  if is_root && [[ -f $conf ]]; then chown "root:$STACK_USER" "$conf"; chmod 0640 "$conf"; fi
  [[ -n $plugin ]] && orthanc_key_store_up
  [[ -n $plugin ]] && orthanc_shim_build
  local tmp; tmp=$(mktemp "$dir/.orthanc.json.XXXXXX")
  render_orthanc_config "$tmp" || { rm -f "$tmp"; die "orthanc: cannot render config"; }
  chmod 0640 "$tmp"
  if is_root; then chown "root:$STACK_USER" "$tmp"; fi
  local changed=1
  if [[ -f $conf ]] && cmp -s "$tmp" "$conf"; then changed=; fi
  if pid_of orthanc >/dev/null; then
    if [[ -z $changed ]] && orthanc_healthy >/dev/null 2>&1; then
      rm -f "$tmp"; log "orthanc: already up"; return 0
    fi
    log "orthanc: configuration or plugin code changed, or unhealthy: restarting"
    stop_pid orthanc 30
  fi
  mv -f "$tmp" "$conf"
  check_port_free orthanc "$ORTHANC_PORT"
  if [[ -n $plugin && ( -d $phi/storage || -d $phi/index ) ]]; then
    # A plaintext archive left from before encryption was enabled: its files are plaintext PHI on
    # disk (docs/design.md invariant); the local demo archive is regenerated data, so remove it.
    warn "orthanc: removing the plaintext demo archive ($phi/storage, $phi/index); the archive is encrypted now"
    rm -rf "$phi/storage" "$phi/index"
  fi
  if [[ -n $plugin ]]; then
    ( orthanc_keys_env; spawn orthanc "$logf" /usr/sbin/Orthanc "$conf" )
  else
    spawn orthanc "$logf" /usr/sbin/Orthanc "$conf"
  fi
  if ! wait_until "$ORTHANC_TIMEOUT" orthanc_healthy || ! pid_of orthanc >/dev/null; then
    show_logs "$logf"
    die "orthanc: not healthy within ${ORTHANC_TIMEOUT}s"
  fi
  # fail closed: the REST API and DICOMweb must refuse anonymous requests
  local code
  code=$(curl -s -m 5 -o /dev/null -w '%{http_code}' "$(orthanc_url)/dicom-web/studies")
  if [[ $code != 401 ]]; then
    stop_pid orthanc 30
    die "orthanc: anonymous GET /dicom-web/studies answered $code, expected 401; stopped it"
  fi
}

orthanc_down() { stop_pid orthanc 30; }

# ---------------------------------------------------------------------------------------------
# Keycloak

keycloak_url()  { printf 'http://%s:%s\n' "$BIND" "$KEYCLOAK_PORT"; }
keycloak_home() { printf '%s/keycloak/keycloak-%s\n' "$STACK" "$KEYCLOAK_VERSION"; }
keycloak_logs() { printf '%s\n' "$STACK/logs/keycloak.log"; }
REALM_FILE="$DEPLOY_DIR/keycloak/imaging-realm.json"

keycloak_healthy() {
  local body
  body=$(curl -fsS -m 5 "$(keycloak_url)/realms/imaging/.well-known/openid-configuration") || return 1
  [[ $body == *"\"issuer\":\"$(keycloak_url)/realms/imaging\""* ]]
}

keycloak_env() {
  # --add-opens: jboss-threads needs it on Java 24+ (else IllegalAccessError traces at shutdown)
  KC_ENV=(env "JAVA_HOME=$JAVA_HOME_21"
          "JAVA_OPTS_APPEND=--add-opens=java.base/java.lang=ALL-UNNAMED"
          "KC_BOOTSTRAP_ADMIN_USERNAME=admin"
          "KC_BOOTSTRAP_ADMIN_PASSWORD=$SECRET_KEYCLOAK_ADMIN_PASSWORD"
          "COMPLIANCE_OIDC_CLIENT_SECRET=$SECRET_OIDC_CLIENT_SECRET")
}

keycloak_install() {
  local home; home=$(keycloak_home)
  [[ -x $home/bin/kc.sh ]] && return 0
  local zip; zip=$(fetch_artifact "$KEYCLOAK_ARTIFACT" "$KEYCLOAK_ZIP" "$KEYCLOAK_SHA256")
  log "keycloak: unpacking $KEYCLOAK_ZIP into $STACK/keycloak"
  mkdir -p "$STACK/keycloak"
  local tmp; tmp=$(mktemp -d "$STACK/keycloak/.unpack.XXXXXX")
  unzip -q "$zip" -d "$tmp"
  chmod -R go-rwx "$tmp"
  mv "$tmp/keycloak-$KEYCLOAK_VERSION" "$home"
  rmdir "$tmp"
  own "$STACK/keycloak"
}

# Realm (re-)import policy: the first start imports the realm (--import-realm). Afterwards,
# when deploy/keycloak/imaging-realm.json changes (sha256 recorded in $STACK/keycloak/realm.sha256),
# Keycloak is stopped and 'kc.sh import --override true' replaces the realm before it starts again.
keycloak_up() {
  local logf home want have
  logf=$(keycloak_logs)
  find_java
  keycloak_install
  home=$(keycloak_home)
  keycloak_env
  want=$(sha256_of "$REALM_FILE")
  have=$(cat "$STACK/keycloak/realm.sha256" 2>/dev/null || true)
  if pid_of keycloak >/dev/null && [[ $want == "$have" ]] && keycloak_healthy; then
    log "keycloak: already up"; return 0
  fi
  mkdir -p "$home/data/import"
  install -m 0600 "$REALM_FILE" "$home/data/import/imaging-realm.json"
  own "$home/data"
  if [[ -n $have && $want != "$have" ]]; then
    log "keycloak: realm file changed since the last import, re-importing (kc.sh import --override true)"
    stop_pid keycloak 60
    printf '\n===== %s: kc.sh import --override true =====\n' "$(date -Is)" >>"$logf"
    if ! (cd "$home" && run_as "${KC_ENV[@]}" bin/kc.sh import \
            --file "$home/data/import/imaging-realm.json" --override true >>"$logf" 2>&1 9>&-); then
      show_logs "$logf"; die "keycloak: realm re-import failed"
    fi
    rm -f "$STACK/keycloak/realm.sha256"
  fi
  if pid_of keycloak >/dev/null; then
    log "keycloak: running but unhealthy, restarting"
    stop_pid keycloak 60
  fi
  check_port_free keycloak "$KEYCLOAK_PORT"
  # The management interface (port 9000) only opens when health or metrics are enabled:
  # both stay off, so the only listener is $BIND:$KEYCLOAK_PORT.
  (cd "$home" && spawn keycloak "$logf" "${KC_ENV[@]}" bin/kc.sh start-dev \
      --http-host="$BIND" --http-port="$KEYCLOAK_PORT" \
      --hostname="http://$BIND:$KEYCLOAK_PORT" \
      --health-enabled=false --metrics-enabled=false \
      --import-realm)
  if ! wait_until "$KEYCLOAK_TIMEOUT" keycloak_healthy || ! pid_of keycloak >/dev/null; then
    show_logs "$logf"
    die "keycloak: realm 'imaging' not served within ${KEYCLOAK_TIMEOUT}s"
  fi
  chmod -R go-rwx "$home/lib"  # Keycloak's build (at its first start) writes lib/ 0644/0744, umask or not
  printf '%s\n' "$want" >"$STACK/keycloak/realm.sha256"
}

keycloak_down() { stop_pid keycloak 60; }

# ---------------------------------------------------------------------------------------------
# Elasticsearch (integ-test zip: no x-pack, hence no security; loopback only)

elasticsearch_url()  { printf 'http://%s:%s\n' "$BIND" "$ELASTICSEARCH_PORT"; }
elasticsearch_logs() { printf '%s\n' "$STACK/logs/elasticsearch.log" "$STACK/elasticsearch/logs/compliance-audit.log"; }

elasticsearch_healthy() {
  local body
  body=$(curl -fsS -m 10 "$(elasticsearch_url)/_cluster/health?timeout=5s") || return 1
  [[ $body == *'"status":"green"'* || $body == *'"status":"yellow"'* ]]
}

# ES home: read-only, root-owned. In the cache (world-readable, it is public software) when the stack
# user can read the cache (not the case for /root/.cache: /root is 0700), otherwise under $STACK/dist,
# readable by the stack user's group only.
elasticsearch_install() {
  local zip base
  base="$CACHE/dist"
  mkdir -p "$base"
  if is_root && ! run_as test -r "$base" -a -x "$base"; then
    base="$STACK/dist"
  fi
  ES_HOME="$base/elasticsearch-$ELASTICSEARCH_VERSION"
  [[ -x $ES_HOME/bin/elasticsearch ]] && return 0
  zip=$(fetch_artifact "$ELASTICSEARCH_ARTIFACT" "$ELASTICSEARCH_ZIP" "$ELASTICSEARCH_SHA256")
  log "elasticsearch: unpacking into $ES_HOME (read-only)"
  mkdir -p "$base"
  local tmp; tmp=$(mktemp -d "$base/.unpack.XXXXXX")
  unzip -q "$zip" -d "$tmp"
  if [[ $base == "$STACK/dist" ]]; then
    share_with_stack "$base" "$tmp"
  else
    chmod 0755 "$base"; chmod -R u+rwX,go+rX,go-w "$tmp"
  fi
  mv "$tmp/elasticsearch-$ELASTICSEARCH_VERSION" "$ES_HOME"
  rmdir "$tmp"
}

elasticsearch_configure() {
  local d="$STACK/elasticsearch" data; data=$(phi_dir elasticsearch/data)
  mkdir -p "$d/config" "$data" "$d/logs" "$d/tmp" "$d/run"
  if [[ $data != "$d/data" ]] && is_root; then chown "$STACK_USER:$STACK_USER" "$data"; fi
  if [[ ! -f $d/config/jvm.options ]]; then
    cp -R "$ES_HOME/config/." "$d/config/"
  fi
  # leftovers of a security auto-configuration (see xpack.security.enabled below): its TLS
  # keystores and the keystore passwords it put into elasticsearch.keystore
  if [[ -d $d/config/certs ]]; then
    rm -rf "$d/config/certs" "$d/config/elasticsearch.keystore"
  fi
  mkdir -p "$d/config/jvm.options.d"
  cat >"$d/config/elasticsearch.yml" <<EOF
# Generated by deploy/local/up; edits are overwritten.
cluster.name: compliance-audit
node.name: local
path.data: $data
path.logs: $d/logs
network.host: $BIND
http.port: $ELASTICSEARCH_PORT
transport.port: $ELASTICSEARCH_TRANSPORT_PORT
discovery.type: single-node
cluster.routing.allocation.disk.threshold_enabled: false
action.destructive_requires_name: true
# The 9.x integ-test zip still ships x-pack-core and x-pack-security (not ILM, data streams,
# analysis-common or ingest-common). Security is switched off explicitly: without this line the
# first start auto-configures TLS and passwords (HTTPS on 9200). Loopback only.
xpack.security.enabled: false
EOF
  printf '%s\n' '# Generated by deploy/local/up' '-Xms1g' '-Xmx1g' >"$d/config/jvm.options.d/compliance.options"
  own "$d"
  chmod 0700 "$d"
}

elasticsearch_up() {
  local logf d="$STACK/elasticsearch"
  logf="$STACK/logs/elasticsearch.log"
  find_java
  elasticsearch_install
  local before=
  [[ -f $d/config/elasticsearch.yml ]] && before=$(cat "$d/config/elasticsearch.yml" "$d/config/jvm.options.d/compliance.options" 2>/dev/null)
  elasticsearch_configure
  local after; after=$(cat "$d/config/elasticsearch.yml" "$d/config/jvm.options.d/compliance.options")
  if pid_of elasticsearch >/dev/null; then
    if [[ $before == "$after" ]] && elasticsearch_healthy; then
      log "elasticsearch: already up"; return 0
    fi
    log "elasticsearch: configuration changed or unhealthy, restarting"
    stop_pid elasticsearch 60
  fi
  check_port_free elasticsearch "$ELASTICSEARCH_PORT"
  check_port_free elasticsearch "$ELASTICSEARCH_TRANSPORT_PORT"
  rm -f "$d/run/elasticsearch.pid"
  rm -rf "$d"/tmp/final-flags*  # left by earlier starts (below); only the launch itself reads them
  server_log "$logf"
  printf '\n===== %s: starting elasticsearch =====\n' "$(date -Is)" >>"$logf"
  # -d daemonises once the node has started (or fails); -p records the server JVM's pid.
  # CLI_JAVA_OPTS: the launcher's own JVM probes the server's JVM flags in a "final-flags*" directory
  # under its temporary directory and leaves it there: keep that in the stack's state, not /tmp.
  if ! run_as env "ES_JAVA_HOME=$JAVA_HOME_21" "ES_PATH_CONF=$d/config" "ES_TMPDIR=$d/tmp" \
        "CLI_JAVA_OPTS=-Djava.io.tmpdir=$d/tmp" \
        timeout "$ELASTICSEARCH_TIMEOUT" setsid "$ES_HOME/bin/elasticsearch" -d -p "$d/run/elasticsearch.pid" \
        >>"$logf" 2>&1 </dev/null 9>&-; then
    show_logs $(elasticsearch_logs)
    die "elasticsearch: failed to start"
  fi
  cp "$d/run/elasticsearch.pid" "$(pidfile elasticsearch)"
  if ! wait_until "$ELASTICSEARCH_TIMEOUT" curl -fsS -m 70 \
        "$(elasticsearch_url)/_cluster/health?wait_for_status=yellow&timeout=60s"; then
    show_logs $(elasticsearch_logs)
    die "elasticsearch: cluster not yellow/green within ${ELASTICSEARCH_TIMEOUT}s"
  fi
  chmod 0600 "$d/config/elasticsearch.keystore" 2>/dev/null || true  # made 0660 at the first start
}

elasticsearch_down() { stop_pid elasticsearch 60; }

# ---------------------------------------------------------------------------------------------
# es_proxy: the secured endpoint of Elasticsearch (deploy/local/es-proxy.conf.template).
# nginx on https://127.0.0.1:9201 in front of the plain 9200, as a secured cluster answers: TLS with a
# CA generated here, and an API key, basic credentials or a client certificate on every request (401
# otherwise). Only this proxy is restarted by its own up/down; Elasticsearch is not touched.
# $STACK/es-proxy (0700, the stack user's): tls/ (CA certificate, server and client certificates and
# keys, 0600; the CA's key is deleted once they are signed), htpasswd and nginx.conf (0600, the latter
# holds the API key), logs/ (access log: who and how, never a credential), tmp/.

ES_PROXY_USER=compliance-gateway
ES_PROXY_TIMEOUT=${COMPLIANCE_ES_PROXY_TIMEOUT:-60}
es_proxy_dir()  { printf '%s/es-proxy\n' "$STACK"; }
es_proxy_url()  { printf 'https://%s:%s\n' "$BIND" "$ES_PROXY_PORT"; }
es_proxy_logs() { printf '%s\n' "$STACK/logs/es-proxy.log" "$(es_proxy_dir)/logs/error.log"; }
# Elasticsearch's API key form: base64 of "id:key"
es_proxy_api_key() { printf '%s:%s' "$ES_PROXY_USER" "$SECRET_ES_PROXY_API_KEY_SECRET" | base64 -w0; }

# es_proxy_curl PATH [CURL ARGS...] : an HTTPS request with the API key (through stdin, never in argv)
es_proxy_curl() {
  local path=$1; shift
  printf 'header = "Authorization: ApiKey %s"\n' "$(es_proxy_api_key)" |
    curl -K - -sS -m 10 --cacert "$(es_proxy_dir)/tls/ca.pem" "$@" "$(es_proxy_url)$path"
}

es_proxy_healthy() {
  load_secrets || return 1
  local body
  body=$(es_proxy_curl '/_cluster/health?timeout=5s' -f) || return 1
  [[ $body == *'"status":"green"'* || $body == *'"status":"yellow"'* ]]
}

# es_proxy_tls DIR : CA, server (IP 127.0.0.1, localhost) and client certificates (EC P-256), made
# when missing or expiring within 30 days. The CA's key is deleted after signing: nothing more can
# be issued under this CA; renewal makes a new CA.
es_proxy_tls() {
  local d=$1 t=$1/tls f
  if [[ -s $t/ca.pem && -s $t/server.key && -s $t/client.key ]]; then
    for f in ca server client; do
      openssl x509 -checkend 2592000 -noout -in "$t/$f.pem" >/dev/null 2>&1 || break
      [[ $f == client ]] && return 0
    done
  fi
  log "es_proxy: generating a CA, a server and a client certificate in $t"
  local new; new=$(mktemp -d "$d/.tls.XXXXXX")
  if ! ( umask 077; set -e; cd "$new"
         openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -sha256 -days 400 \
           -keyout ca.key -out ca.pem -subj "/CN=compliance local stack Elasticsearch CA" \
           -addext "basicConstraints=critical,CA:TRUE,pathlen:0" -addext "keyUsage=critical,keyCertSign,cRLSign"
         printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
           "extendedKeyUsage=serverAuth" "subjectAltName=IP:$BIND,DNS:localhost" \
           "subjectKeyIdentifier=hash" "authorityKeyIdentifier=keyid:always" >server.ext
         printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
           "extendedKeyUsage=clientAuth" "subjectKeyIdentifier=hash" "authorityKeyIdentifier=keyid:always" >client.ext
         for who in server client; do
           openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -sha256 \
             -keyout "$who.key" -out "$who.csr" -subj "/CN=compliance local stack Elasticsearch $who"
           openssl x509 -req -in "$who.csr" -CA ca.pem -CAkey ca.key -set_serial "0x$(openssl rand -hex 16)" \
             -days 397 -sha256 -extfile "$who.ext" -out "$who.pem"
         done
         rm -f ca.key ./*.csr ./*.ext
         chmod 0600 ./* ) >>"$STACK/logs/es-proxy.log" 2>&1; then
    rm -rf "$new"; show_logs "$STACK/logs/es-proxy.log"; die "es_proxy: cannot generate the certificates (openssl)"
  fi
  rm -rf "$t"; mv "$new" "$t"; chmod 0700 "$t"
}

# es_proxy_htpasswd DIR : the basic credentials (SHA-512 crypt), rewritten only when the password changed
es_proxy_htpasswd() {
  local f=$1/htpasswd hash salt
  if [[ -s $f ]]; then
    hash=$(sed -n "s/^$ES_PROXY_USER://p" "$f")
    salt=$(cut -d'$' -f3 <<<"$hash")
    [[ -n $salt && $(printf '%s\n' "$SECRET_ES_PROXY_PASSWORD" | openssl passwd -6 -salt "$salt" -stdin) == "$hash" ]] \
      && return 0
  fi
  hash=$(printf '%s\n' "$SECRET_ES_PROXY_PASSWORD" | openssl passwd -6 -stdin) || die "es_proxy: openssl passwd failed"
  ( umask 077; printf '%s:%s\n' "$ES_PROXY_USER" "$hash" >"$f.tmp" ) && mv -f "$f.tmp" "$f"
}

es_proxy_configure() {
  local d text tmp; d=$(es_proxy_dir)
  ( umask 077; mkdir -p "$d/logs" "$d/tmp" )
  chmod 0700 "$d" "$d/logs" "$d/tmp"
  es_proxy_tls "$d"
  es_proxy_htpasswd "$d"
  text=$(<"$LIB_DIR/es-proxy.conf.template")
  text=${text//@STATE@/"$d"}
  text=${text//@LISTEN@/"$BIND:$ES_PROXY_PORT"}
  text=${text//@UPSTREAM@/"$BIND:$ELASTICSEARCH_PORT"}
  text=${text//@API_KEY@/"$(es_proxy_api_key)"}
  tmp=$(umask 077; mktemp "$d/.nginx.conf.XXXXXX")
  printf '%s\n' "$text" >"$tmp"
  if [[ -f $d/nginx.conf ]] && cmp -s "$tmp" "$d/nginx.conf"; then rm -f "$tmp"; else mv -f "$tmp" "$d/nginx.conf"; fi
  find "$d" -type d -exec chmod 0700 {} + -o -type f -exec chmod 0600 {} +
  own "$d"
}

es_proxy_state() { { cat "$(es_proxy_dir)"/{nginx.conf,htpasswd} "$(es_proxy_dir)"/tls/*.pem 2>/dev/null || true; } | sha256sum; }

es_proxy_up() {
  local d logf before nginx code; d=$(es_proxy_dir)
  logf="$STACK/logs/es-proxy.log"
  nginx=$(command -v nginx || echo /usr/sbin/nginx)
  [[ -x $nginx ]] || die "es_proxy: nginx missing (Debian nginx-light)"
  ( umask 077; touch "$logf" ); chmod 0600 "$logf"
  before=$(es_proxy_state)
  es_proxy_configure
  if pid_of es_proxy >/dev/null; then
    if [[ $before == "$(es_proxy_state)" ]] && es_proxy_healthy; then log "es_proxy: already up"; return 0; fi
    log "es_proxy: configuration, certificates or credentials changed, or unhealthy: restarting the proxy"
    stop_pid es_proxy 15
  fi
  check_port_free es_proxy "$ES_PROXY_PORT"
  if ! ( umask 077; run_as "$nginx" -t -q -c "$d/nginx.conf" -p "$d" -e "$d/logs/error.log" ) >>"$logf" 2>&1; then
    show_logs "$logf"; die "es_proxy: nginx refused $d/nginx.conf"
  fi
  ( umask 077; spawn es_proxy "$logf" "$nginx" -c "$d/nginx.conf" -p "$d" -e "$d/logs/error.log" )
  if ! wait_until "$ES_PROXY_TIMEOUT" es_proxy_healthy || ! pid_of es_proxy >/dev/null; then
    show_logs $(es_proxy_logs)
    die "es_proxy: Elasticsearch not healthy through $(es_proxy_url) within ${ES_PROXY_TIMEOUT}s (is the elasticsearch component up?)"
  fi
  # fail closed: no credentials, a wrong API key or wrong basic credentials must all be 401
  local probe
  for probe in '' 'header = "Authorization: ApiKey d3Jvbmc6d3Jvbmc="' 'user = "compliance-gateway:wrong"'; do
    code=$(printf '%s\n' "$probe" | curl -K - -s -m 5 -o /dev/null -w '%{http_code}' \
             --cacert "$d/tls/ca.pem" "$(es_proxy_url)/_cluster/health" || true)
    if [[ $code != 401 ]]; then
      stop_pid es_proxy 15
      die "es_proxy: a request without valid credentials answered $code, expected 401; stopped the proxy"
    fi
  done
}

es_proxy_down() { stop_pid es_proxy 15; }

# ---------------------------------------------------------------------------------------------
# PostgreSQL

postgres_url()  { printf 'postgresql://compliance@%s:%s/compliance\n' "$BIND" "$POSTGRES_PORT"; }
postgres_logs() { printf '%s\n' "$STACK/logs/postgres.log"; }

find_pg_bin() {
  [[ -n ${PG_BIN:-} ]] && return 0
  local best
  best=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k4,4n | tail -n1)
  [[ -n $best && -x $best/pg_ctl ]] || die "postgres: no PostgreSQL server binaries under /usr/lib/postgresql"
  PG_BIN=$best
}

postgres_healthy() {
  find_pg_bin
  load_secrets || return 1
  "$PG_BIN/pg_isready" -q -h "$BIND" -p "$POSTGRES_PORT" -d compliance -U compliance || return 1
  [[ $(PGPASSWORD="$SECRET_POSTGRES_PASSWORD" PGCONNECT_TIMEOUT=5 "$PG_BIN/psql" -X -A -t -q \
        -h "$BIND" -p "$POSTGRES_PORT" -U compliance -d compliance -c 'select 1' 2>/dev/null) == 1 ]]
}

postgres_sync_pid() {
  local pm; pm="$(phi_dir postgres/data)/postmaster.pid"
  [[ -r $pm ]] && head -n1 "$pm" >"$(pidfile postgres)"
}

postgres_up() {
  local d="$STACK/postgres" logf data; data=$(phi_dir postgres/data)
  logf=$(postgres_logs)
  find_pg_bin
  mkdir -p "$d/socket"
  own "$d"; chmod 0700 "$d" "$d/socket"
  server_log "$logf"
  postgres_sync_pid || true
  if pid_of postgres >/dev/null && postgres_healthy; then
    log "postgres: already up"; return 0
  fi
  if [[ ! -s $data/PG_VERSION ]]; then
    log "postgres: initdb into $data"
    rm -rf "$data"
    if ! run_as "$PG_BIN/initdb" -D "$data" --encoding=UTF8 --locale=C.UTF-8 \
          --auth-local=peer --auth-host=scram-sha-256 >>"$logf" 2>&1; then
      show_logs "$logf"; die "postgres: initdb failed"
    fi
    printf "\ninclude_if_exists = 'compliance.conf'\n" >>"$data/postgresql.conf"
  fi
  cat >"$data/compliance.conf" <<EOF
# Generated by deploy/local/up; edits are overwritten.
listen_addresses = '$BIND'
port = $POSTGRES_PORT
unix_socket_directories = '$d/socket'
unix_socket_permissions = 0700
password_encryption = 'scram-sha-256'
EOF
  own "$data/compliance.conf"
  if ! pid_of postgres >/dev/null; then
    rm -f "$(pidfile postgres)"
    check_port_free postgres "$POSTGRES_PORT"
    if ! run_as "$PG_BIN/pg_ctl" -D "$data" -l "$logf" -w -t "$POSTGRES_TIMEOUT" start >/dev/null 9>&-; then
      show_logs "$logf"; die "postgres: failed to start within ${POSTGRES_TIMEOUT}s"
    fi
    postgres_sync_pid
  fi
  # role and database (idempotent); the password goes through stdin, never argv
  local su=(run_as "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$d/socket" -p "$POSTGRES_PORT" -d postgres)
  if ! "${su[@]}" -v "pw=$SECRET_POSTGRES_PASSWORD" >>"$logf" 2>&1 <<'SQL'
SELECT 'CREATE ROLE compliance LOGIN' WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'compliance') \gexec
ALTER ROLE compliance WITH LOGIN NOSUPERUSER NOCREATEROLE PASSWORD :'pw';
SELECT 'CREATE DATABASE compliance OWNER compliance ENCODING ''UTF8''' WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'compliance') \gexec
ALTER DATABASE compliance OWNER TO compliance;
SQL
  then
    show_logs "$logf"; die "postgres: creating role/database failed"
  fi
  if ! wait_until "$POSTGRES_TIMEOUT" postgres_healthy; then
    show_logs "$logf"; die "postgres: not healthy within ${POSTGRES_TIMEOUT}s"
  fi
}

postgres_down() {
  local data; data=$(phi_dir postgres/data)
  find_pg_bin
  postgres_sync_pid || true
  if pid_of postgres >/dev/null; then
    log "postgres: stopping"
    run_as "$PG_BIN/pg_ctl" -D "$data" -m fast -w -t 60 stop >/dev/null || stop_pid postgres 30
  fi
  rm -f "$(pidfile postgres)"
}

# ---------------------------------------------------------------------------------------------
# status

# component_state COMP -> prints up|unhealthy|down
component_state() {
  local comp=$1
  [[ $comp == postgres ]] && { postgres_sync_pid 2>/dev/null || true; }
  if ! pid_of "$comp" >/dev/null 2>&1; then
    printf 'down\n'; return
  fi
  if "${comp}_healthy" >/dev/null 2>&1; then printf 'up\n'; else printf 'unhealthy\n'; fi
}
