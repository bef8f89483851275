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
# Install methods: the deb or rpm package when the host has dpkg/apt or
# rpm/dnf/yum and the server's signed repository offers that package (the
# host is pointed at the repository, so `apt-get upgrade` / `dnf upgrade`
# reach later versions; the package's own scripts restart the agent and
# record the method), else the binary method
# (/usr/bin/linkmesh-agent and a unit in /etc/systemd/system). A host whose
# agent came from a package stays on it.
#
# Options:
#   --server URL        fleet server (required)
#   --ca-pin sha256:HEX pin of the server's CA (required unless --ca-file)
#   --ca-file FILE      the server's CA certificate instead of a pin
#   --token TOKEN | --token-file FILE   enrolment token (or LINKMESH_TOKEN)
#   --version X.Y.Z     install this version (also how a rollback is done)
#   --allow-ahead       install even when the version is newer than the fleet
#                       server (labs; also LINKMESH_ALLOW_AHEAD=1)
#   --force             re-enrol a host enrolled with another server
#   --method M          auto (default), deb, rpm or binary
#   --mirror URL        the package method's repository from a mirror of the
#                       server's /apt and /yum, or a directory holding an
#                       offline bundle (linkmesh-fleet repo-bundle) as
#                       file:///DIR (trust stays pinned to the fleet's
#                       archive key, fetched from the server)
#   --dry-run           print each step that would change the host; change nothing
#
# Exit codes:
#   0 done   2 usage   3 unsupported system or missing tool   4 not root
#   5 server unreachable or download failed   6 CA does not match the pin
#   7 checksum mismatch   8 enrolment refused (token, version)
#   9 enrolled with another server (use --force)   10 service failed to start
#   11 post-install check failed   12 refused: newer than the fleet server
#   (the server is upgraded first; --allow-ahead overrides)   13 the new
#   version failed its probation and the previous one was put back
#
# Everything runs from main(), called on the last line, so a truncated
# download runs nothing.
set -eu

PREFIX_BIN=/usr/bin
CONFIG_DIR=/etc/linkmesh
STATE_DIR=/var/lib/linkmesh-agent
UNIT_PATH=/etc/systemd/system/linkmesh-agent.service
UPGRADE_UNIT_PATH=/etc/systemd/system/linkmesh-upgrade.service
ENROLL_UNIT_PATH=/etc/systemd/system/linkmesh-enroll.service
APT_SOURCE=/etc/apt/sources.list.d/linkmesh.sources
APT_CONF=/etc/apt/apt.conf.d/60linkmesh
YUM_REPO=/etc/yum.repos.d/linkmesh.repo
RPM_KEY=/etc/pki/rpm-gpg/RPM-GPG-KEY-linkmesh
PROBATION=$STATE_DIR/upgrade/probation.json
OUTCOME=$STATE_DIR/upgrade/outcome.json
OUTCOME_BEFORE=""

SERVER=""
CA_PIN=""
CA_FILE=""
TOKEN=""
TOKEN_FILE=""
VERSION=""
METHOD=auto
MIRROR=""
# The package revision linkmesh-package builds (packaging/package.toml).
PKG_RELEASE=1
FORCE=0
DRY_RUN=0
ALLOW_AHEAD=0
case "${LINKMESH_ALLOW_AHEAD:-}" in 1 | true | yes) ALLOW_AHEAD=1 ;; esac
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

# Puts a fully written temp file in place: fsync it, rename it, fsync the
# directory (coreutils sync FILE), so a crash leaves the old file or the new.
durable_rename() {
	sync "$1" 2>/dev/null || true
	run mv -f "$1" "$2"
	sync "$(dirname "$2")" 2>/dev/null || true
}

usage() {
	cat >&2 <<'USAGE'
usage: install.sh --server https://SERVER (--ca-pin sha256:HEX | --ca-file FILE)
                  [--token-file FILE | --token TOKEN] [--version X.Y.Z] [--force] [--dry-run]
                  [--method auto|deb|rpm|binary] [--mirror URL] [--allow-ahead]
The token may also come from LINKMESH_TOKEN. Exit codes: 2 usage, 3 unsupported
system, 4 not root, 5 download failed, 6 CA pin mismatch, 7 checksum mismatch,
8 enrolment refused, 9 enrolled elsewhere (--force), 10 service failed, 11 check
failed, 12 newer than the fleet server (upgrade the server first), 13 rolled
back (the new version failed its probation).
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
		--method) METHOD=${2:-}; shift 2 ;;
		--method=*) METHOD=${1#*=}; shift ;;
		--mirror) MIRROR=${2:-}; shift 2 ;;
		--mirror=*) MIRROR=${1#*=}; shift ;;
		--force) FORCE=1; shift ;;
		--allow-ahead) ALLOW_AHEAD=1; shift ;;
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
	SERVER_HOST=$(url_host "$SERVER")
	if [ -z "$CA_PIN" ] && [ -z "$CA_FILE" ]; then
		die 2 "--ca-pin sha256:HEX (or --ca-file FILE) is required: the server is never trusted blindly"
	fi
	case "$CA_PIN" in
	"" | sha256:*) ;;
	*) die 2 "--ca-pin must look like sha256:HEX" ;;
	esac
	case "$METHOD" in
	auto | deb | rpm | binary) ;;
	*) die 2 "--method must be auto, deb, rpm or binary, got '$METHOD'" ;;
	esac
	case "$MIRROR" in
	"") ;;
	https://* | http://*) MIRROR=${MIRROR%/} ;;
	file:///*)
		MIRROR=${MIRROR%/}
		[ -d "${MIRROR#file://}" ] || die 2 "--mirror $MIRROR: no such directory on this host (unpack the offline bundle there first)"
		;;
	*) die 2 "--mirror must be an http://, https:// or file:/// URL (a mirror of $SERVER/apt and /yum, or an offline bundle's directory), got $MIRROR" ;;
	esac
	if [ -n "$TOKEN" ] && [ -n "$TOKEN_FILE" ]; then
		die 2 "give the token once: --token or --token-file"
	fi
	if [ -z "$TOKEN" ] && [ -n "$TOKEN_FILE" ]; then
		[ -r "$TOKEN_FILE" ] || die 2 "cannot read --token-file $TOKEN_FILE"
	fi
	if [ "$ALLOW_AHEAD" -eq 1 ]; then
		# The package's own preinst/%pre judge again, and the final check
		# judges the agent's place in the window: both read this.
		export LINKMESH_ALLOW_AHEAD=1
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
	case "$ARCH" in
	amd64) RPM_ARCH=x86_64 ;;
	arm64) RPM_ARCH=aarch64 ;;
	esac
	OS_ID=unknown
	OS_LIKE=""
	if [ -r /etc/os-release ]; then
		# shellcheck disable=SC1091
		OS_ID=$(. /etc/os-release && printf '%s' "${ID:-unknown}")
		# shellcheck disable=SC1091
		OS_LIKE=$(. /etc/os-release && printf '%s' "${ID_LIKE:-}")
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
		# Both given: the file must be the pinned CA.
		[ -n "$CA_PIN" ] || return 0
	else
		curl -fsSk --max-time 20 -o "$WORK/ca.pem" "$SERVER/ca.pem" ||
			die 5 "cannot reach $SERVER (fetching $SERVER/ca.pem)"
	fi
	got=sha256:$(openssl x509 -in "$WORK/ca.pem" -pubkey -noout 2>/dev/null |
		openssl pkey -pubin -outform der 2>/dev/null | sha256sum | cut -d' ' -f1)
	want=$(printf '%s' "$CA_PIN" | tr 'A-F' 'a-f')
	[ "$got" = "$want" ] || die 6 "the CA of $SERVER (or --ca-file) does not match --ca-pin; nothing was installed"
}

fetch() {
	rc=0
	curl -fsS --max-time 120 --cacert "$WORK/ca.pem" -o "$2" "$SERVER/$1" || rc=$?
	case $rc in
	0) ;;
	6 | 7 | 28) die 5 "cannot reach $SERVER (fetching $SERVER/$1)" ;;
	*) die 5 "cannot download $SERVER/$1" ;;
	esac
}

# Which package, if any, owns the agent on this host now.
installed_package() {
	if command -v dpkg-query >/dev/null 2>&1 &&
		[ "$(dpkg-query -W -f='${db:Status-Status}' linkmesh-agent 2>/dev/null || true)" = installed ]; then
		echo deb
	elif command -v rpm >/dev/null 2>&1 && rpm -q linkmesh-agent >/dev/null 2>&1; then
		echo rpm
	fi
}

# The package format this system uses, if it has the tools for one.
system_package_format() {
	case " $OS_ID $OS_LIKE " in
	*" debian "* | *" ubuntu "*)
		command -v dpkg >/dev/null 2>&1 && echo deb ;;
	*" rhel "* | *" fedora "* | *" centos "* | *" suse "* | *" amzn "*)
		command -v rpm >/dev/null 2>&1 && echo rpm ;;
	esac
}

# The installed package's version (upstream part), empty when none.
package_version() {
	case "$1" in
	deb) v=$(dpkg-query -W -f='${Version}' linkmesh-agent 2>/dev/null) || v="" ;;
	rpm) v=$(rpm -q --qf '%{VERSION}-%{RELEASE}' linkmesh-agent 2>/dev/null) || v="" ;;
	esac
	printf '%s' "$v"
}

# Fetches NAME and NAME.sha256 from the server's artifacts and verifies one
# against the other. Returns 1 (and fetches nothing) when the server does
# not offer NAME; dies on any other failure.
fetch_verified() {
	if ! curl -fsS --max-time 120 --cacert "$WORK/ca.pem" -o "$WORK/$1.sha256" \
		"$SERVER/artifacts/$1.sha256" 2>"$WORK/curl.err"; then
		grep -q 'error: 404' "$WORK/curl.err" && return 1
		die 5 "cannot download $SERVER/artifacts/$1.sha256: $(cat "$WORK/curl.err")"
	fi
	fetch "artifacts/$1" "$WORK/$1"
	want=$(cut -d' ' -f1 <"$WORK/$1.sha256")
	got=$(sha256sum "$WORK/$1" | cut -d' ' -f1)
	if [ -z "$want" ] || [ "$got" != "$want" ]; then
		die 7 "checksum mismatch for $1 (expected $want, got $got); the previous installation is untouched"
	fi
}

# Step 4: the version, the method and the artifact, verified.
download_agent() {
	if [ -z "$VERSION" ]; then
		fetch agent/latest "$WORK/latest"
		VERSION=$(tr -d ' \n' <"$WORK/latest")
	fi
	case "$VERSION" in
	[0-9]*.[0-9]*.[0-9]*) ;;
	*) die 5 "the server named no usable version ($VERSION)" ;;
	esac
	OWNER=$(installed_package)
	case "$METHOD" in
	auto)
		if [ -n "$OWNER" ]; then
			METHOD=$OWNER
		else
			METHOD=$(system_package_format)
			METHOD=${METHOD:-binary}
		fi
		AUTO=1
		;;
	*) AUTO=0 ;;
	esac
	if [ -n "$OWNER" ] && [ "$METHOD" != "$OWNER" ]; then
		die 3 "linkmesh-agent is installed from the $OWNER package; remove it first to use --method $METHOD (the identity is kept)"
	fi
	case "$METHOD" in
	deb)
		command -v dpkg >/dev/null 2>&1 || die 3 "--method deb needs dpkg (OS: $OS_ID)"
		PKG=linkmesh-agent_$VERSION-${PKG_RELEASE}_$ARCH.deb
		;;
	rpm)
		command -v rpm >/dev/null 2>&1 || die 3 "--method rpm needs rpm (OS: $OS_ID)"
		PKG=linkmesh-agent-$VERSION-$PKG_RELEASE.$RPM_ARCH.rpm
		;;
	binary) PKG="" ;;
	esac
	if [ -n "$PKG" ]; then
		if [ -n "$OWNER" ] && [ "$(package_version "$OWNER")" = "$VERSION-$PKG_RELEASE" ]; then
			say "linkmesh-agent $VERSION ($OWNER package) is already installed"
			fetch_archive_key
			return 0
		fi
		fetch_package && return 0
		if [ "$AUTO" -eq 0 ] || [ -n "$OWNER" ]; then
			die 5 "the $METHOD repository of $(repo_base) offers no linkmesh-agent $VERSION-$PKG_RELEASE; publish it there or pick another --version"
		fi
		say "$SERVER offers no $METHOD package of $VERSION; using the binary method"
		METHOD=binary
		PKG=""
	fi
	NAME=linkmesh-agent-$VERSION-linux-$ARCH
	fetch_verified "$NAME" || die 5 "$SERVER offers no $NAME (artifacts/$NAME.sha256: 404); pick another --version"
	fetch linkmesh-agent.service "$WORK/linkmesh-agent.service"
	fetch linkmesh-upgrade.service "$WORK/linkmesh-upgrade.service"
	fetch linkmesh-enroll.service "$WORK/linkmesh-enroll.service"
	fetch collector.yaml "$WORK/collector.yaml"
}

# Step 4b: server first. The version about to be installed is judged by its
# own binary (for a package, the one inside it) against the fleet server's
# version, by the agent's one skew rule: newer than the server is refused
# before anything on the host changes. A target too old to know the check
# is judged by the installed agent, if any.
server_first() {
	judge=""
	if [ "$METHOD" = binary ]; then
		judge=$WORK/$NAME
		chmod 0755 "$judge"
	elif [ -n "$PKG" ] && [ -f "$WORK/$PKG" ]; then
		judge=$WORK/judge
		case "$METHOD" in
		deb) dpkg-deb --fsys-tarfile "$WORK/$PKG" | tar -xOf - ./usr/bin/linkmesh-agent >"$judge" 2>/dev/null || judge="" ;;
		rpm) rpm2archive -n - <"$WORK/$PKG" 2>/dev/null | tar -xOf - ./usr/bin/linkmesh-agent >"$judge" 2>/dev/null || judge="" ;;
		esac
		[ -z "$judge" ] || chmod 0755 "$judge"
	else
		return 0 # this version is installed already
	fi
	ahead=""
	[ "$ALLOW_AHEAD" -eq 1 ] && ahead=--allow-ahead
	for j in $judge "$PREFIX_BIN/linkmesh-agent"; do
		[ -x "$j" ] || continue
		rc=0
		# shellcheck disable=SC2086
		"$j" server-first --to "$VERSION" --server "$SERVER" --ca-file "$WORK/ca.pem" $ahead || rc=$?
		case $rc in
		0) return 0 ;;
		12) die 12 "linkmesh-agent $VERSION was not installed: the fleet server is upgraded first (see above); nothing on this host was changed" ;;
		2) continue ;; # a version that predates the check
		*) die 12 "the server-first check of linkmesh-agent $VERSION failed (exit $rc); nothing on this host was changed" ;;
		esac
	done
	say "warning: no agent here knows the server-first check; installing linkmesh-agent $VERSION unchecked"
}

# Where the package method's repositories are: the server, or --mirror.
repo_base() {
	printf '%s' "${MIRROR:-$SERVER}"
}

# The host part of a URL (apt's per-host options are keyed by it).
url_host() {
	h=${1#*://}
	h=${h%%/*}
	case "$h" in
	\[*) h=${h%%]*}] ;;
	*:*) h=${h%:*} ;;
	esac
	printf '%s' "$h"
}

# The fleet's archive keys (binary keyring and armoured), over the
# CA-verified connection to the server itself, never from a mirror.
fetch_archive_key() {
	[ -f "$WORK/linkmesh-archive.gpg" ] && return 0
	fetch keys/linkmesh-archive.gpg "$WORK/linkmesh-archive.gpg"
	fetch keys/linkmesh-archive.asc "$WORK/linkmesh-archive.asc"
}

# Fetches PATH of the repository (the server, or --mirror: trusted the
# host's usual way unless it is the server's host) into FILE. Returns 1
# on 404; dies on any other failure.
repo_fetch() {
	ca=$WORK/ca.pem
	if [ -n "$MIRROR" ] && [ "$(url_host "$MIRROR")" != "$SERVER_HOST" ]; then
		ca="" # the mirror's own certificate, checked the host's usual way
	fi
	if ! curl -fsS --max-time 120 ${ca:+--cacert "$ca"} -o "$2" "$(repo_base)/$1" 2>"$WORK/curl.err"; then
		# 404 from a web server, "Couldn't open file" from a file:/// bundle.
		grep -q "error: 404\|(37)" "$WORK/curl.err" && return 1
		die 5 "cannot download $(repo_base)/$1: $(cat "$WORK/curl.err")"
	fi
}

# apt with a throw-away configuration in $WORK: only the fleet's
# repository, its keyring from $WORK, nothing of the host's apt state
# touched (so a refused version changes nothing).
apt_scratch() {
	a=$WORK/apt
	"$@" -q -o Dir::Etc::SourceList="$a/linkmesh.sources" -o Dir::Etc::SourceParts="$a/parts" \
		-o Dir::State::Lists="$a/lists" -o Dir::Cache="$a/cache" -o Debug::NoLocking=1 \
		-o APT::Sandbox::User=root -o "Acquire::https::$SERVER_HOST::CaInfo=$WORK/ca.pem"
}

# The deb822 source of the fleet's repository, signed by KEYRING.
apt_source() {
	printf '# The LinkMesh agent from the fleet server (written by install.sh; a re-run rewrites it).\n'
	printf 'Types: deb\nURIs: %s/apt\nSuites: stable\nComponents: main\nSigned-By: %s\n' "$(repo_base)" "$1"
}

# Step 4, package method: the package, from the signed repository, into
# $WORK/$PKG. apt (or rpmkeys) checks it against the fleet's archive key.
# Returns 1 when the repository does not offer this version.
fetch_package() {
	fetch_archive_key
	case "$METHOD" in
	deb)
		command -v apt-get >/dev/null 2>&1 || die 3 "--method deb installs from the fleet's apt repository and needs apt-get (OS: $OS_ID)"
		mkdir -p "$WORK/apt/parts" "$WORK/apt/lists/partial" "$WORK/apt/cache/archives/partial"
		apt_source "$WORK/linkmesh-archive.gpg" >"$WORK/apt/linkmesh.sources"
		repo_fetch apt/dists/stable/InRelease "$WORK/InRelease" || return 1
		if ! apt_scratch apt-get update >"$WORK/apt.log" 2>&1 || grep -q '^[WE]:' "$WORK/apt.log"; then
			cat "$WORK/apt.log" >&2
			if grep -q 'GPG error\|not signed\|NO_PUBKEY\|BADSIG\|Hash Sum mismatch\|Hashes' "$WORK/apt.log"; then
				die 7 "the apt repository of $(repo_base) is not signed by the fleet's archive key (above); nothing was installed"
			fi
			die 5 "cannot read the apt repository of $(repo_base) (above)"
		fi
		(cd "$WORK" && apt_scratch apt-get download "linkmesh-agent=$VERSION-$PKG_RELEASE" >"$WORK/apt.log" 2>&1) || {
			if grep -q "for 'linkmesh-agent' was not found\|Unable to locate package" "$WORK/apt.log"; then
				say "apt: $(grep '^E:' "$WORK/apt.log" | head -n 1)"
				return 1
			fi
			cat "$WORK/apt.log" >&2
			die 7 "apt could not fetch linkmesh-agent $VERSION-$PKG_RELEASE from $(repo_base) (above); nothing was installed"
		}
		[ -f "$WORK/$PKG" ] || die 5 "apt fetched no $PKG from $(repo_base)"
		;;
	rpm)
		# The metadata dnf will read is the fleet's (dnf checks it again,
		# repo_gpgcheck=1); gpgv comes with gnupg, which dnf needs anyway.
		repo_fetch yum/repodata/repomd.xml "$WORK/repomd.xml" || return 1
		repo_fetch yum/repodata/repomd.xml.asc "$WORK/repomd.xml.asc" ||
			die 7 "the rpm repository of $(repo_base) has no signature (repodata/repomd.xml.asc); nothing was installed"
		if command -v gpgv >/dev/null 2>&1; then
			gpgv --keyring "$WORK/linkmesh-archive.gpg" "$WORK/repomd.xml.asc" "$WORK/repomd.xml" >"$WORK/gpgv.log" 2>&1 || {
				cat "$WORK/gpgv.log" >&2
				die 7 "the rpm repository of $(repo_base) is not signed by the fleet's archive key (above); nothing was installed"
			}
		fi
		repo_fetch "yum/packages/$PKG" "$WORK/$PKG" || return 1
		mkdir -p "$WORK/rpmdb"
		rpmkeys --dbpath "$WORK/rpmdb" --import "$WORK/linkmesh-archive.asc" ||
			die 7 "the fleet's archive key from $SERVER does not import into rpm (above)"
		if ! rpmkeys --dbpath "$WORK/rpmdb" --checksig "$WORK/$PKG" >"$WORK/rpm.log" 2>&1 ||
			! grep -q 'signatures OK' "$WORK/rpm.log"; then
			cat "$WORK/rpm.log" >&2
			die 7 "$PKG from $(repo_base) is not signed by the fleet's archive key (above); nothing was installed"
		fi
		;;
	esac
}

# Writes FILE (mode MODE) from TEMP only when it differs: a re-run leaves
# every repository file byte-identical.
put_file() {
	if cmp -s "$1" "$2" 2>/dev/null; then
		rm -f "$1"
		return 0
	fi
	if [ "$DRY_RUN" -eq 1 ]; then
		printf 'would write: %s\n' "$2"
		rm -f "$1"
		return 0
	fi
	run install -d -m 0755 "$(dirname "$2")"
	chmod "$3" "$1"
	durable_rename "$1" "$2"
}

# Step 5a, package method: the host points at the fleet's repository, its
# archive key and (for that host only) the fleet's CA.
configure_repository() {
	fetch_archive_key
	cp "$WORK/ca.pem" "$WORK/fleet-ca.pem.new"
	put_file "$WORK/fleet-ca.pem.new" "$CONFIG_DIR/fleet-ca.pem" 0644
	mirror_host=$(url_host "$(repo_base)")
	case "$METHOD" in
	deb)
		cp "$WORK/linkmesh-archive.gpg" "$WORK/keyring.new"
		put_file "$WORK/keyring.new" /etc/apt/keyrings/linkmesh-archive.gpg 0644
		apt_source /etc/apt/keyrings/linkmesh-archive.gpg >"$WORK/sources.new"
		put_file "$WORK/sources.new" "$APT_SOURCE" 0644
		{
			printf '// The fleet CA, trusted for the LinkMesh repository host only (install.sh).\n'
			printf 'Acquire::https::%s::CaInfo "%s/fleet-ca.pem";\n' "$SERVER_HOST" "$CONFIG_DIR"
			if [ -n "$mirror_host" ] && [ "$mirror_host" != "$SERVER_HOST" ]; then
				printf '// The mirror %s is trusted the host'"'"'s usual way; its packages still need the fleet'"'"'s key.\n' "$mirror_host"
			fi
		} >"$WORK/aptconf.new"
		put_file "$WORK/aptconf.new" "$APT_CONF" 0644
		;;
	rpm)
		cp "$WORK/linkmesh-archive.asc" "$WORK/key.new"
		put_file "$WORK/key.new" "$RPM_KEY" 0644
		{
			printf '# The LinkMesh agent from the fleet server (written by install.sh; a re-run rewrites it).\n'
			printf '[linkmesh]\nname=LinkMesh agent (%s)\nbaseurl=%s/yum\nenabled=1\n' "$SERVER" "$(repo_base)"
			printf 'gpgcheck=1\nrepo_gpgcheck=1\ngpgkey=file://%s\n' "$RPM_KEY"
			if [ -z "$MIRROR" ] || [ "$mirror_host" = "$SERVER_HOST" ]; then
				printf 'sslcacert=%s/fleet-ca.pem\n' "$CONFIG_DIR"
			fi
			# A new version is seen by the next `dnf upgrade`; the server
			# being away never blocks the host's other repositories.
			printf 'metadata_expire=0\nskip_if_unavailable=1\n'
		} >"$WORK/repo.new"
		put_file "$WORK/repo.new" "$YUM_REPO" 0644
		;;
	esac
}

# Step 5, package method: the package manager installs $VERSION from the
# repository, verifying it again, and its scripts restart an enrolled
# agent and record the method.
install_package() {
	CHANGED=0
	[ -n "$PKG" ] || return 0
	configure_repository
	[ -f "$WORK/$PKG" ] || return 0 # this version is installed already
	case "$METHOD" in
	deb)
		run apt-get update -q -o Dir::Etc::SourceList="$APT_SOURCE" -o Dir::Etc::SourceParts=- \
			-o APT::Get::List-Cleanup=0 ||
			die 5 "apt-get update of $APT_SOURCE failed (see above)"
		# An edited /etc/linkmesh/agent.toml is kept, never prompted for.
		run env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --allow-downgrades \
			-o Dpkg::Options::=--force-confold -o Dpkg::Options::=--force-confdef \
			"linkmesh-agent=$VERSION-$PKG_RELEASE" ||
			die 3 "apt-get could not install linkmesh-agent $VERSION-$PKG_RELEASE (see above)"
		;;
	rpm)
		installed=$(package_version rpm)
		verb=install
		if [ -n "$installed" ] &&
			[ "$(printf '%s\n%s\n' "$installed" "$VERSION-$PKG_RELEASE" | sort -V | head -n 1)" = "$VERSION-$PKG_RELEASE" ]; then
			verb=downgrade
		fi
		if command -v dnf >/dev/null 2>&1; then
			run dnf -y -q --disablerepo='*' --enablerepo=linkmesh "$verb" "linkmesh-agent-$VERSION-$PKG_RELEASE" ||
				die 3 "dnf could not $verb linkmesh-agent $VERSION-$PKG_RELEASE (see above)"
		elif command -v yum >/dev/null 2>&1; then
			run yum -y -q --disablerepo='*' --enablerepo=linkmesh "$verb" "linkmesh-agent-$VERSION-$PKG_RELEASE" ||
				die 3 "yum could not $verb linkmesh-agent $VERSION-$PKG_RELEASE (see above)"
		else
			# rpm alone: the package checked above against the archive key.
			run rpm -U --oldpackage "$WORK/$PKG" ||
				die 3 "rpm could not install $PKG (see above)"
		fi
		;;
	esac
	# The package is kept for a later rollback to this version.
	if [ "$DRY_RUN" -ne 1 ]; then
		"$PREFIX_BIN/linkmesh-agent" upgrade keep-package "$WORK/$PKG" 2>/dev/null ||
			say "note: could not keep $PKG for a later rollback"
	fi
}

# Before the binary is replaced: the installed agent keeps itself (the
# upgrade watcher and the rollback copy) and opens the probation of
# $VERSION; linkmesh-upgrade.service takes it once the new agent started.
keep_previous() {
	if [ -x "$PREFIX_BIN/linkmesh-agent" ] && [ -f "$STATE_DIR/identity/identity.toml" ] && [ "$HAVE_SYSTEMD" -eq 1 ]; then
		run "$PREFIX_BIN/linkmesh-agent" upgrade keep --to "$VERSION" --method binary ||
			say "warning: could not open the upgrade probation; installing $VERSION unwatched"
	fi
}

# A probation left open (its watcher killed, or still running): let it
# finish before anything else changes, so a rollback is never overtaken.
finish_open_upgrade() {
	OUTCOME_BEFORE=$(cat "$OUTCOME" 2>/dev/null || true)
	[ -f "$PROBATION" ] && [ "$HAVE_SYSTEMD" -eq 1 ] || return 0
	if [ "$DRY_RUN" -eq 1 ]; then
		say "an agent upgrade is on probation; a real run lets its watcher finish it first"
		return 0
	fi
	say "an agent upgrade is on probation or being rolled back; letting its watcher finish first (linkmesh-agent upgrade status)"
	systemctl start --wait linkmesh-upgrade.service ||
		say "warning: the upgrade watcher did not finish cleanly: journalctl -u linkmesh-upgrade"
	"$PREFIX_BIN/linkmesh-agent" upgrade status >&2 || true
	OUTCOME_BEFORE=$(cat "$OUTCOME" 2>/dev/null || true)
}

# The version this run installed failed its probation while the run went on,
# and the watcher put the previous one back: say so, do not report success.
rolled_back_during_run() {
	# A rollback under way finishes first (bounded: it is one package
	# install and one restart).
	n=0
	while grep -q '"rolling_back"' "$PROBATION" 2>/dev/null && [ "$n" -lt 300 ]; do
		sleep 1
		n=$((n + 1))
	done
	[ -f "$OUTCOME" ] && [ ! -f "$PROBATION" ] || return 1
	[ "$(cat "$OUTCOME" 2>/dev/null || true)" != "$OUTCOME_BEFORE" ] || return 1
	"$PREFIX_BIN/linkmesh-agent" upgrade status 2>/dev/null | grep -q "^last upgrade: rolled_back $VERSION -> "
}

# Step 5: install in place (a rename, so a running agent is never half-written).
install_agent() {
	if [ "$METHOD" != binary ]; then
		install_package
		return 0
	fi
	if [ -x "$PREFIX_BIN/linkmesh-agent" ] &&
		[ "$(sha256sum "$PREFIX_BIN/linkmesh-agent" | cut -d' ' -f1)" = "$got" ]; then
		say "linkmesh-agent $VERSION is already installed"
		CHANGED=0
	else
		keep_previous
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
			durable_rename "$CONFIG_DIR/.agent.toml.new" "$CONFIG_DIR/agent.toml"
		fi
	fi
	# The local collector configuration: the shipped default only where none
	# is; an operator's file is never touched.
	if [ ! -f "$CONFIG_DIR/collector.yaml" ]; then
		if [ "$DRY_RUN" -eq 1 ]; then
			printf 'would write: %s\n' "$CONFIG_DIR/collector.yaml"
		else
			run install -d -m 0755 "$CONFIG_DIR"
			cp "$WORK/collector.yaml" "$CONFIG_DIR/.collector.yaml.new"
			chmod 0644 "$CONFIG_DIR/.collector.yaml.new"
			durable_rename "$CONFIG_DIR/.collector.yaml.new" "$CONFIG_DIR/collector.yaml"
		fi
	fi
	run install -d -m 0700 "$STATE_DIR"
	if [ "$(cat "$STATE_DIR/install-method" 2>/dev/null || true)" != script ]; then
		if [ "$DRY_RUN" -eq 1 ]; then
			printf 'would write: %s\n' "$STATE_DIR/install-method"
		else
			printf 'script\n' >"$STATE_DIR/.install-method.new"
			durable_rename "$STATE_DIR/.install-method.new" "$STATE_DIR/install-method"
		fi
	fi
}

# Step 6: enrol unless already enrolled with this server.
enrol() {
	agent=$PREFIX_BIN/linkmesh-agent
	if [ "$DRY_RUN" -eq 1 ] && [ ! -x "$agent" ]; then
		if [ "$METHOD" != binary ]; then
			printf 'would run: %s enroll --server %s --ca-file <verified CA> (token from the environment)\n' "$agent" "$SERVER"
			return 0
		fi
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
	if [ "$METHOD" = binary ] && ! cmp -s "$WORK/linkmesh-agent.service" "$UNIT_PATH" 2>/dev/null; then
		run install -m 0644 "$WORK/linkmesh-agent.service" "$UNIT_PATH"
		run systemctl daemon-reload
		CHANGED=1
	fi
	if [ "$METHOD" = binary ] && ! cmp -s "$WORK/linkmesh-upgrade.service" "$UPGRADE_UNIT_PATH" 2>/dev/null; then
		run install -m 0644 "$WORK/linkmesh-upgrade.service" "$UPGRADE_UNIT_PATH"
		run systemctl daemon-reload
		run systemctl enable --quiet linkmesh-upgrade.service
	fi
	if [ "$METHOD" = binary ] && ! cmp -s "$WORK/linkmesh-enroll.service" "$ENROLL_UNIT_PATH" 2>/dev/null; then
		run install -m 0644 "$WORK/linkmesh-enroll.service" "$ENROLL_UNIT_PATH"
		run systemctl daemon-reload
		run systemctl enable --quiet linkmesh-enroll.service
	fi
	run systemctl enable --quiet linkmesh-agent.service
	if [ "$CHANGED" -eq 1 ] || ! systemctl is-active --quiet linkmesh-agent.service; then
		# The watcher first, so its window covers the new agent's start.
		watch_upgrade
		started=0
		run systemctl restart linkmesh-agent.service && started=1
		if [ "$started" -ne 1 ]; then
			if rolled_back_during_run; then
				"$PREFIX_BIN/linkmesh-agent" upgrade status >&2 || true
				die 13 "linkmesh-agent $VERSION failed its probation and was rolled back (above); the previous version runs, with its identity"
			fi
			die 10 "linkmesh-agent.service failed to start: journalctl -u linkmesh-agent$(rollback_note)"
		fi
	fi
}

# What to add to a failure while an upgrade is on probation.
rollback_note() {
	[ -f "$PROBATION" ] || return 0
	printf '; the upgrade is on probation: linkmesh-upgrade.service puts the previous version back if the new one does not recover (linkmesh-agent upgrade status)'
}

# After the new agent was started: its probation's watcher takes over (the
# package scripts start it themselves).
watch_upgrade() {
	[ -f "$PROBATION" ] && [ "$DRY_RUN" -ne 1 ] && [ "$METHOD" = binary ] || return 0
	run systemctl start --no-block linkmesh-upgrade.service ||
		say "warning: could not start linkmesh-upgrade.service: a failing upgrade will not be rolled back"
}

# Step 8: say how it went.
final_check() {
	if [ "$DRY_RUN" -eq 1 ]; then
		say "dry run: nothing was changed"
		return 0
	fi
	if rolled_back_during_run; then
		"$PREFIX_BIN/linkmesh-agent" upgrade status >&2 || true
		die 13 "linkmesh-agent $VERSION failed its probation and was rolled back (above); the previous version runs, with its identity"
	fi
	"$PREFIX_BIN/linkmesh-agent" check || die 11 "installed, but 'linkmesh-agent check' reports problems (above)$(rollback_note)"
}

main() {
	parse_args "$@"
	detect_system
	check_root
	finish_open_upgrade
	establish_trust
	download_agent
	server_first
	install_agent
	enrol
	start_service
	final_check
}

main "$@"
