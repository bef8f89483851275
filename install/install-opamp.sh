#!/bin/sh
# install-opamp.sh: installs the collector runtime the fleet pins
# (otelcol-contrib run by opampsupervisor) for linkmesh-agent to supervise.
#
#   curl -fsSL https://SERVER/install-opamp.sh | sudo sh -s -- \
#       --server https://SERVER --ca-pin sha256:HEX
#
# Downloads the versions the server pins (or --otelcol-version /
# --supervisor-version), verifies them against their checksums in either
# release format (one ARTIFACT.sha256 per artifact, as releases ship since
# v0.158.0, or one combined checksums file before), installs them in place,
# disables a standalone otelcol-contrib.service (two collectors would fight
# over ports), records the versions for linkmesh-agent, and, only when a
# binary changed, restarts the runtime's unit (linkmesh-collector.service)
# and reloads the agent (or restarts an agent that runs it as a child). The supervisor's storage (the collector's
# instance id) lives in the agent's state directory and is never touched.
#
# An upgrade is on probation (--probation, 60 s by default): the previous
# binaries are kept in /var/lib/linkmesh-agent/runtime/previous/, and when
# the new collector does not stay up (it crashes, its supervisor fails, or
# the server sees it unhealthy over OpAMP) they are put back, the runtime is
# restarted on them, and the outcome is recorded for the agent to report.
#
# Exit codes: 0 done, 2 usage, 3 unsupported system or missing tool, 4 not
# root, 5 download failed, 6 CA does not match the pin, 7 checksum mismatch,
# 8 the new runtime failed its probation and the previous one was put back.
set -eu

BIN_DIR=/usr/bin
STATE_DIR=/var/lib/linkmesh-agent
SERVER=""
CA_PIN=""
CA_FILE=""
OTELCOL_VERSION=""
SUPERVISOR_VERSION=""
DRY_RUN=0
WORK=""
CHANGED=0
PROBATION=60s
PREVIOUS=$STATE_DIR/runtime/previous
KEPT=0

say() { printf 'linkmesh-install-opamp: %s\n' "$*" >&2; }
die() {
	code=$1
	shift
	say "error: $*"
	exit "$code"
}

run() {
	if [ "$DRY_RUN" -eq 1 ]; then
		printf 'would run: %s\n' "$*"
		return 0
	fi
	say "+ $*"
	"$@"
}

parse_args() {
	while [ $# -gt 0 ]; do
		case "$1" in
		--server) SERVER=${2:-}; shift 2 ;;
		--server=*) SERVER=${1#*=}; shift ;;
		--ca-pin) CA_PIN=${2:-}; shift 2 ;;
		--ca-pin=*) CA_PIN=${1#*=}; shift ;;
		--ca-file) CA_FILE=${2:-}; shift 2 ;;
		--ca-file=*) CA_FILE=${1#*=}; shift ;;
		--otelcol-version) OTELCOL_VERSION=${2:-}; shift 2 ;;
		--otelcol-version=*) OTELCOL_VERSION=${1#*=}; shift ;;
		--supervisor-version) SUPERVISOR_VERSION=${2:-}; shift 2 ;;
		--supervisor-version=*) SUPERVISOR_VERSION=${1#*=}; shift ;;
		--probation) PROBATION=${2:-}; shift 2 ;;
		--probation=*) PROBATION=${1#*=}; shift ;;
		--dry-run) DRY_RUN=1; shift ;;
		-h | --help)
			say "usage: install-opamp.sh --server https://SERVER (--ca-pin sha256:HEX | --ca-file FILE) [--otelcol-version X] [--supervisor-version X] [--probation 60s] [--dry-run]"
			exit 2
			;;
		*) die 2 "unknown option $1 (see --help)" ;;
		esac
	done
	case "$SERVER" in
	https://*) SERVER=${SERVER%/} ;;
	*) die 2 "--server https://HOST[:PORT] is required" ;;
	esac
	if [ -z "$CA_PIN" ] && [ -z "$CA_FILE" ]; then
		die 2 "--ca-pin sha256:HEX (or --ca-file FILE) is required"
	fi
}

# Step 1: the system and privilege.
detect_system() {
	[ "$(uname -s)" = Linux ] || die 3 "only Linux is supported"
	case "$(uname -m)" in
	x86_64 | amd64) ARCH=amd64 ;;
	aarch64 | arm64) ARCH=arm64 ;;
	*) die 3 "unsupported architecture $(uname -m)" ;;
	esac
	for tool in curl sha256sum openssl tar mktemp install; do
		command -v "$tool" >/dev/null 2>&1 || die 3 "$tool is required; install it and run again"
	done
	[ "$(id -u)" -eq 0 ] || die 4 "run as root"
	HAVE_SYSTEMD=0
	if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
		HAVE_SYSTEMD=1
	fi
}

# Step 2: trust, as install.sh does: the CA checked against the pin first.
establish_trust() {
	WORK=$(mktemp -d)
	trap 'rm -rf "$WORK"' EXIT
	trap 'rm -rf "$WORK"; exit 130' INT TERM
	if [ -n "$CA_FILE" ]; then
		cp "$CA_FILE" "$WORK/ca.pem" || die 2 "cannot read --ca-file $CA_FILE"
		# Both given: the file must be the pinned CA.
		[ -n "$CA_PIN" ] || return 0
	else
		curl -fsSk --max-time 20 -o "$WORK/ca.pem" "$SERVER/ca.pem" || die 5 "cannot reach $SERVER"
	fi
	got=sha256:$(openssl x509 -in "$WORK/ca.pem" -pubkey -noout 2>/dev/null |
		openssl pkey -pubin -outform der 2>/dev/null | sha256sum | cut -d' ' -f1)
	want=$(printf '%s' "$CA_PIN" | tr 'A-F' 'a-f')
	[ "$got" = "$want" ] || die 6 "the CA of $SERVER (or --ca-file) does not match --ca-pin; nothing was installed"
}

fetch() {
	curl -fsS --max-time 300 --cacert "$WORK/ca.pem" -o "$2" "$SERVER/$1"
}

# Step 3: which versions.
pick_versions() {
	fetch runtime/pins "$WORK/pins" || die 5 "cannot download $SERVER/runtime/pins"
	[ -n "$OTELCOL_VERSION" ] || OTELCOL_VERSION=$(sed -n 's/^otelcol-contrib \(.*\)$/\1/p' "$WORK/pins")
	[ -n "$SUPERVISOR_VERSION" ] || SUPERVISOR_VERSION=$(sed -n 's/^opampsupervisor \(.*\)$/\1/p' "$WORK/pins")
	if [ -z "$OTELCOL_VERSION" ] || [ -z "$SUPERVISOR_VERSION" ]; then
		die 5 "the server pins no otelcol-contrib/opampsupervisor version; pass --otelcol-version and --supervisor-version"
	fi
}

# Verifies $WORK/$1 against NAME.sha256 (v0.158.0 and later) or, failing
# that, against the combined checksums file $2 (earlier releases).
verify() {
	name=$1
	combined=$2
	if fetch "artifacts/$name.sha256" "$WORK/$name.sha256" 2>/dev/null; then
		want=$(cut -d' ' -f1 <"$WORK/$name.sha256")
	elif fetch "artifacts/$combined" "$WORK/$combined" 2>/dev/null; then
		want=$(awk -v n="$name" '$2 == n || $2 == "*" n { print $1 }' "$WORK/$combined")
	else
		die 5 "no checksum for $name: neither $name.sha256 nor $combined on $SERVER"
	fi
	got=$(sha256sum "$WORK/$name" | cut -d' ' -f1)
	if [ -z "$want" ] || [ "$got" != "$want" ]; then
		die 7 "checksum mismatch for $name (expected ${want:-none}, got $got); the installed runtime is untouched"
	fi
}

# Step 4: download and verify both before installing either.
download() {
	COL_ARCHIVE=otelcol-contrib_${OTELCOL_VERSION}_linux_${ARCH}.tar.gz
	SUP_BINARY=opampsupervisor_${SUPERVISOR_VERSION}_linux_${ARCH}
	fetch "artifacts/$COL_ARCHIVE" "$WORK/$COL_ARCHIVE" || die 5 "cannot download $SERVER/artifacts/$COL_ARCHIVE"
	verify "$COL_ARCHIVE" opentelemetry-collector-releases_otelcol-contrib_checksums.txt
	fetch "artifacts/$SUP_BINARY" "$WORK/$SUP_BINARY" || die 5 "cannot download $SERVER/artifacts/$SUP_BINARY"
	verify "$SUP_BINARY" checksums.txt
	mkdir "$WORK/col"
	tar -xzf "$WORK/$COL_ARCHIVE" -C "$WORK/col" otelcol-contrib || die 7 "$COL_ARCHIVE holds no otelcol-contrib"
}

# Installs $1 as $BIN_DIR/$2 by rename, unless it is already there.
place() {
	if [ -f "$BIN_DIR/$2" ] && cmp -s "$1" "$BIN_DIR/$2"; then
		say "$2 is up to date"
		return 0
	fi
	run install -m 0755 "$1" "$BIN_DIR/.$2.new"
	run mv -f "$BIN_DIR/.$2.new" "$BIN_DIR/$2"
	CHANGED=1
}

# The installed runtime, kept before it is replaced: the binaries and the
# versions record, for a rollback. Only a runtime the agent recorded
# (versions.toml) is kept; a first install has nothing to go back to.
keep_previous() {
	[ -f "$STATE_DIR/runtime/versions.toml" ] && [ -x "$BIN_DIR/otelcol-contrib" ] && [ -x "$BIN_DIR/opampsupervisor" ] || return 0
	if cmp -s "$WORK/col/otelcol-contrib" "$BIN_DIR/otelcol-contrib" && cmp -s "$WORK/$SUP_BINARY" "$BIN_DIR/opampsupervisor"; then
		return 0
	fi
	run install -d -m 0700 "$PREVIOUS"
	for b in otelcol-contrib opampsupervisor; do
		run install -m 0755 "$BIN_DIR/$b" "$PREVIOUS/.$b.new"
		run mv -f "$PREVIOUS/.$b.new" "$PREVIOUS/$b"
	done
	run install -m 0600 "$STATE_DIR/runtime/versions.toml" "$PREVIOUS/.versions.toml.new"
	run mv -f "$PREVIOUS/.versions.toml.new" "$PREVIOUS/versions.toml"
	KEPT=1
}

# The runtime restarted on what is in $BIN_DIR, and the agent told.
reapply() {
	if [ -f /etc/systemd/system/linkmesh-collector.service ]; then
		# The runtime has a unit of its own: restart it on the new binaries,
		# then let the agent re-read its versions without restarting.
		run systemctl try-restart linkmesh-collector.service
		if systemctl is-active --quiet linkmesh-agent.service 2>/dev/null; then
			run systemctl reload linkmesh-agent.service
		fi
	elif systemctl is-enabled --quiet linkmesh-agent.service 2>/dev/null; then
		run systemctl restart linkmesh-agent.service
	fi
}

# Step 6: probation. The agent watches the new runtime; a failure puts the
# kept binaries back.
probation() {
	[ "$KEPT" -eq 1 ] && [ "$DRY_RUN" -ne 1 ] && [ -x "$BIN_DIR/linkmesh-agent" ] || return 0
	[ ! -f "$STATE_DIR/runtime-stopped" ] || return 0 # stopped on purpose: nothing to watch
	systemctl is-active --quiet linkmesh-agent.service 2>/dev/null || {
		say "warning: linkmesh-agent is not running, so the new runtime is not watched"
		return 0
	}
	from=$(sed -n 's/^otelcol-contrib = "\(.*\)"$/\1/p' "$PREVIOUS/versions.toml")
	say "otelcol-contrib $OTELCOL_VERSION is on probation for $PROBATION (the previous $from is kept)"
	rc=0
	reason=$("$BIN_DIR/linkmesh-agent" runtime probation --from "$from" --to "$OTELCOL_VERSION" --window "$PROBATION") || rc=$?
	case $rc in
	0)
		say "probation passed: $reason"
		return 0
		;;
	1) ;;
	*)
		say "warning: the runtime probation could not run (exit $rc); the new runtime stays, unwatched"
		return 0
		;;
	esac
	say "the new runtime failed its probation: $reason"
	for b in otelcol-contrib opampsupervisor; do
		run install -m 0755 "$PREVIOUS/$b" "$BIN_DIR/.$b.new"
		run mv -f "$BIN_DIR/.$b.new" "$BIN_DIR/$b"
	done
	run install -m 0600 "$PREVIOUS/versions.toml" "$STATE_DIR/runtime/.versions.toml.new"
	run mv -f "$STATE_DIR/runtime/.versions.toml.new" "$STATE_DIR/runtime/versions.toml"
	reapply
	"$BIN_DIR/linkmesh-agent" runtime outcome --outcome rolled_back --from "$OTELCOL_VERSION" --to "$from" --reason "$reason" ||
		say "warning: could not record the rollback"
	die 8 "otelcol-contrib $OTELCOL_VERSION failed its probation ($reason); $from was put back and runs again"
}

# Step 5: install, record, disable the standalone collector, re-apply.
install_runtime() {
	keep_previous
	place "$WORK/col/otelcol-contrib" otelcol-contrib
	place "$WORK/$SUP_BINARY" opampsupervisor
	record="otelcol-contrib = \"$OTELCOL_VERSION\"
opampsupervisor = \"$SUPERVISOR_VERSION\""
	if [ "$(cat "$STATE_DIR/runtime/versions.toml" 2>/dev/null || true)" != "$record" ]; then
		run install -d -m 0700 "$STATE_DIR" "$STATE_DIR/runtime"
		if [ "$DRY_RUN" -eq 1 ]; then
			printf 'would write: %s\n' "$STATE_DIR/runtime/versions.toml"
		else
			printf '%s\n' "$record" >"$STATE_DIR/runtime/.versions.toml.new"
			run mv -f "$STATE_DIR/runtime/.versions.toml.new" "$STATE_DIR/runtime/versions.toml"
		fi
	fi
	[ "$HAVE_SYSTEMD" -eq 1 ] || return 0
	for unit in otelcol-contrib.service opampsupervisor.service; do
		if systemctl is-enabled --quiet "$unit" 2>/dev/null || systemctl is-active --quiet "$unit" 2>/dev/null; then
			run systemctl disable --now --quiet "$unit"
		fi
	done
	[ "$CHANGED" -eq 1 ] || return 0
	reapply
	probation
}

main() {
	parse_args "$@"
	detect_system
	establish_trust
	pick_versions
	download
	install_runtime
	if [ "$DRY_RUN" -eq 1 ]; then
		say "dry run: nothing was changed"
	else
		say "otelcol-contrib $OTELCOL_VERSION and opampsupervisor $SUPERVISOR_VERSION are installed"
	fi
}

main "$@"
