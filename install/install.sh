#!/bin/sh
# linkmesh-agent installer: installs or reinstalls the agent in place,
# enrols the host if it is not enrolled, and (re)starts the service.
#
#   curl -fsSL https://SERVER/install.sh | sudo sh -s -- \
#       --server https://SERVER --ca-pin sha256:HEX [--token-file FILE]
#
# The token comes from --token-file, LINKMESH_TOKEN or --token; it is passed
# to `linkmesh-agent enroll` in that process's environment only, never
# written to disk or printed. Configuration is written only where there is
# none; the identity is never touched by a re-run.
#
# Options:
#   --server URL        fleet server (required)
#   --ca-pin sha256:HEX pin of the server's CA (required unless --ca-file)
#   --ca-file FILE      the server's CA certificate instead of a pin
#   --token TOKEN | --token-file FILE   enrolment token (or LINKMESH_TOKEN)
#   --version X.Y.Z     install this version (also how a rollback is done)
#   --force             re-enrol a host enrolled with another server
#   --dry-run           print each step that would change the host; change nothing
#
# Exit codes:
#   0 done   2 usage   3 unsupported system or missing tool   4 not root
#   5 server unreachable or download failed   6 CA does not match the pin
#   7 checksum mismatch   8 enrolment refused (token, version)
#   9 enrolled with another server (use --force)   10 service failed to start
#   11 post-install check failed
#
# Everything runs from main(), called on the last line, so a truncated
# download runs nothing.
set -eu

PREFIX_BIN=/usr/bin
CONFIG_DIR=/etc/linkmesh
STATE_DIR=/var/lib/linkmesh-agent
UNIT_PATH=/etc/systemd/system/linkmesh-agent.service

SERVER=""
CA_PIN=""
CA_FILE=""
TOKEN=""
TOKEN_FILE=""
VERSION=""
FORCE=0
DRY_RUN=0
WORK=""

say() { printf 'linkmesh-install: %s\n' "$*" >&2; }
die() {
	code=$1
	shift
	say "error: $*"
	exit "$code"
}

# Every command that changes the host goes through run(): shown, and only
# shown under --dry-run.
run() {
	if [ "$DRY_RUN" -eq 1 ]; then
		printf 'would run: %s\n' "$*"
		return 0
	fi
	say "+ $*"
	"$@"
}

usage() {
	cat >&2 <<'USAGE'
usage: install.sh --server https://SERVER (--ca-pin sha256:HEX | --ca-file FILE)
                  [--token-file FILE | --token TOKEN] [--version X.Y.Z] [--force] [--dry-run]
The token may also come from LINKMESH_TOKEN. Exit codes: 2 usage, 3 unsupported
system, 4 not root, 5 download failed, 6 CA pin mismatch, 7 checksum mismatch,
8 enrolment refused, 9 enrolled elsewhere (--force), 10 service failed, 11 check failed.
USAGE
	exit 2
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
		--token) TOKEN=${2:-}; shift 2 ;;
		--token=*) TOKEN=${1#*=}; shift ;;
		--token-file) TOKEN_FILE=${2:-}; shift 2 ;;
		--token-file=*) TOKEN_FILE=${1#*=}; shift ;;
		--version) VERSION=${2:-}; shift 2 ;;
		--version=*) VERSION=${1#*=}; shift ;;
		--force) FORCE=1; shift ;;
		--dry-run) DRY_RUN=1; shift ;;
		-h | --help) usage ;;
		*) die 2 "unknown option $1 (see --help)" ;;
		esac
	done
	[ -n "$SERVER" ] || die 2 "--server https://HOST[:PORT] is required"
	case "$SERVER" in
	https://*) SERVER=${SERVER%/} ;;
	*) die 2 "--server must be an https:// URL, got $SERVER" ;;
	esac
	if [ -z "$CA_PIN" ] && [ -z "$CA_FILE" ]; then
		die 2 "--ca-pin sha256:HEX (or --ca-file FILE) is required: the server is never trusted blindly"
	fi
	case "$CA_PIN" in
	"" | sha256:*) ;;
	*) die 2 "--ca-pin must look like sha256:HEX" ;;
	esac
	if [ -n "$TOKEN" ] && [ -n "$TOKEN_FILE" ]; then
		die 2 "give the token once: --token or --token-file"
	fi
	if [ -z "$TOKEN" ] && [ -n "$TOKEN_FILE" ]; then
		[ -r "$TOKEN_FILE" ] || die 2 "cannot read --token-file $TOKEN_FILE"
	fi
}

# Step 1: the system.
detect_system() {
	[ "$(uname -s)" = Linux ] || die 3 "only Linux is supported (uname -s: $(uname -s))"
	case "$(uname -m)" in
	x86_64 | amd64) ARCH=amd64 ;;
	aarch64 | arm64) ARCH=arm64 ;;
	*) die 3 "unsupported architecture $(uname -m); supported: x86_64, aarch64" ;;
	esac
	OS_ID=unknown
	if [ -r /etc/os-release ]; then
		# shellcheck disable=SC1091
		OS_ID=$(. /etc/os-release && printf '%s' "${ID:-unknown}")
	fi
	for tool in curl sha256sum openssl mktemp install; do
		command -v "$tool" >/dev/null 2>&1 || die 3 "$tool is required (OS: $OS_ID); install it and run again"
	done
	HAVE_SYSTEMD=0
	if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
		HAVE_SYSTEMD=1
	fi
}

# Step 2: privilege.
check_root() {
	if [ "$(id -u)" -ne 0 ]; then
		die 4 "run as root: curl -fsSL $SERVER/install.sh | sudo sh -s -- --server $SERVER ..."
	fi
}

# Step 3: trust. The CA is fetched without verification, then checked against
# the pin before anything else is downloaded; everything after verifies the
# server against that CA.
establish_trust() {
	WORK=$(mktemp -d)
	trap 'rm -rf "$WORK"' EXIT
	trap 'rm -rf "$WORK"; exit 130' INT TERM
	if [ -n "$CA_FILE" ]; then
		cp "$CA_FILE" "$WORK/ca.pem" || die 2 "cannot read --ca-file $CA_FILE"
		return 0
	fi
	curl -fsSk --max-time 20 -o "$WORK/ca.pem" "$SERVER/ca.pem" ||
		die 5 "cannot reach $SERVER (fetching $SERVER/ca.pem)"
	got=sha256:$(openssl x509 -in "$WORK/ca.pem" -pubkey -noout 2>/dev/null |
		openssl pkey -pubin -outform der 2>/dev/null | sha256sum | cut -d' ' -f1)
	want=$(printf '%s' "$CA_PIN" | tr 'A-F' 'a-f')
	[ "$got" = "$want" ] || die 6 "the CA of $SERVER does not match --ca-pin; nothing was installed"
}

fetch() {
	curl -fsS --max-time 120 --cacert "$WORK/ca.pem" -o "$2" "$SERVER/$1" ||
		die 5 "cannot download $SERVER/$1"
}

# Step 4: the binary, verified.
download_agent() {
	if [ -z "$VERSION" ]; then
		fetch agent/latest "$WORK/latest"
		VERSION=$(tr -d ' \n' <"$WORK/latest")
	fi
	case "$VERSION" in
	[0-9]*.[0-9]*.[0-9]*) ;;
	*) die 5 "the server named no usable version ($VERSION)" ;;
	esac
	NAME=linkmesh-agent-$VERSION-linux-$ARCH
	fetch "artifacts/$NAME" "$WORK/$NAME"
	fetch "artifacts/$NAME.sha256" "$WORK/$NAME.sha256"
	want=$(cut -d' ' -f1 <"$WORK/$NAME.sha256")
	got=$(sha256sum "$WORK/$NAME" | cut -d' ' -f1)
	if [ -z "$want" ] || [ "$got" != "$want" ]; then
		die 7 "checksum mismatch for $NAME (expected $want, got $got); the previous installation is untouched"
	fi
	fetch linkmesh-agent.service "$WORK/linkmesh-agent.service"
}

# Step 5: install in place (a rename, so a running agent is never half-written).
install_agent() {
	if [ -x "$PREFIX_BIN/linkmesh-agent" ] &&
		[ "$(sha256sum "$PREFIX_BIN/linkmesh-agent" | cut -d' ' -f1)" = "$got" ]; then
		say "linkmesh-agent $VERSION is already installed"
		CHANGED=0
	else
		run install -m 0755 "$WORK/$NAME" "$PREFIX_BIN/.linkmesh-agent.new"
		run mv -f "$PREFIX_BIN/.linkmesh-agent.new" "$PREFIX_BIN/linkmesh-agent"
		CHANGED=1
	fi
	if [ ! -f "$CONFIG_DIR/agent.toml" ]; then
		run install -d -m 0755 "$CONFIG_DIR" "$CONFIG_DIR/agent.d"
		if [ "$DRY_RUN" -eq 1 ]; then
			printf 'would write: %s\n' "$CONFIG_DIR/agent.toml"
		else
			printf '# Written by install.sh; edit freely, it is never overwritten.\nserver = "%s"\n' "$SERVER" \
				>"$CONFIG_DIR/.agent.toml.new"
			run mv -f "$CONFIG_DIR/.agent.toml.new" "$CONFIG_DIR/agent.toml"
		fi
	fi
	run install -d -m 0700 "$STATE_DIR"
	if [ "$(cat "$STATE_DIR/install-method" 2>/dev/null || true)" != script ]; then
		if [ "$DRY_RUN" -eq 1 ]; then
			printf 'would write: %s\n' "$STATE_DIR/install-method"
		else
			printf 'script\n' >"$STATE_DIR/.install-method.new"
			run mv -f "$STATE_DIR/.install-method.new" "$STATE_DIR/install-method"
		fi
	fi
}

# Step 6: enrol unless already enrolled with this server.
enrol() {
	agent=$PREFIX_BIN/linkmesh-agent
	if [ "$DRY_RUN" -eq 1 ] && [ ! -x "$agent" ]; then
		# Nothing installed yet: ask the downloaded (verified) binary instead.
		agent=$WORK/$NAME
		chmod 0755 "$agent"
	fi
	status=$("$agent" status --json 2>/dev/null || true)
	case "$status" in
	*'"enrolled":true'*)
		current=$(printf '%s' "$status" | sed -n 's/.*"server":"\([^"]*\)".*/\1/p')
		host_id=$(printf '%s' "$status" | sed -n 's/.*"host_id":"\([^"]*\)".*/\1/p')
		if [ "$current" = "$SERVER" ] || [ "$current" = "$SERVER:443" ] || [ "${current%:443}" = "$SERVER" ]; then
			if [ "$FORCE" -ne 1 ]; then
				say "already enrolled with $current as host $host_id; keeping the identity"
				if [ -n "$TOKEN" ] || [ -n "$TOKEN_FILE" ] || [ -n "${LINKMESH_TOKEN:-}" ]; then
					say "the enrolment token given was not used (the host is enrolled; --force would replace its identity); it stays valid for another host"
				fi
				return 0
			fi
			say "--force: replacing the identity of host $host_id with a new one from $SERVER"
		elif [ "$FORCE" -ne 1 ]; then
			die 9 "this host is enrolled with $current (host $host_id), not $SERVER: pass --force to re-enrol (the current identity stays until the new one is complete)"
		fi
		;;
	esac
	if [ -z "$TOKEN" ] && [ -n "$TOKEN_FILE" ]; then
		TOKEN=$(cat "$TOKEN_FILE")
	fi
	if [ -z "$TOKEN" ]; then
		TOKEN=${LINKMESH_TOKEN:-}
	fi
	[ -n "$TOKEN" ] || die 2 "an enrolment token is needed: --token-file FILE, LINKMESH_TOKEN or --token"
	force=""
	[ "$FORCE" -eq 1 ] && force=--force
	if [ "$DRY_RUN" -eq 1 ]; then
		printf 'would run: %s enroll --server %s --ca-file %s %s (token from the environment)\n' "$agent" "$SERVER" "$WORK/ca.pem" "$force"
		return 0
	fi
	say "+ $agent enroll --server $SERVER --ca-file <verified CA> $force"
	# shellcheck disable=SC2086
	LINKMESH_TOKEN=$TOKEN "$agent" enroll --server "$SERVER" --ca-file "$WORK/ca.pem" $force ||
		die 8 "enrolment with $SERVER was refused (see the message above)"
}

# Step 7: the service.
start_service() {
	if [ "$HAVE_SYSTEMD" -ne 1 ]; then
		say "no systemd here: start the agent with '$PREFIX_BIN/linkmesh-agent run' under your service manager"
		return 0
	fi
	if ! cmp -s "$WORK/linkmesh-agent.service" "$UNIT_PATH" 2>/dev/null; then
		run install -m 0644 "$WORK/linkmesh-agent.service" "$UNIT_PATH"
		run systemctl daemon-reload
		CHANGED=1
	fi
	run systemctl enable --quiet linkmesh-agent.service
	if [ "$CHANGED" -eq 1 ] || ! systemctl is-active --quiet linkmesh-agent.service; then
		run systemctl restart linkmesh-agent.service ||
			die 10 "linkmesh-agent.service failed to start: journalctl -u linkmesh-agent"
	fi
}

# Step 8: say how it went.
final_check() {
	if [ "$DRY_RUN" -eq 1 ]; then
		say "dry run: nothing was changed"
		return 0
	fi
	"$PREFIX_BIN/linkmesh-agent" check || die 11 "installed, but 'linkmesh-agent check' reports problems (above)"
}

main() {
	parse_args "$@"
	detect_system
	check_root
	establish_trust
	download_agent
	install_agent
	enrol
	start_service
	final_check
}

main "$@"
