# Shared by every linkmesh-agent maintainer script, deb and rpm alike;
# linkmesh-package puts it after the shebang and `set -e` of each script.
# Each format's own script only maps its arguments onto these functions.
#
# The contract: the identity and state in /var/lib/linkmesh-agent survive
# upgrade, downgrade, remove and reinstall, and go only on purge (deb). An
# enrolled host runs the newly installed agent when the package manager is
# done; a host that is not enrolled is never started. The collector runtime
# (linkmesh-collector.service, written by the agent, owned by no package) is
# never stopped by these scripts but on purge: upgrades, downgrades and
# removals of the agent leave its processes running.

LM_UNIT=linkmesh-agent.service
LM_STATE=/var/lib/linkmesh-agent
LM_IDENTITY=$LM_STATE/identity/identity.toml
# Where install.sh's binary method puts its copy of the unit. Under /etc it
# would shadow the packaged unit in /usr/lib.
LM_SCRIPT_UNIT=/etc/systemd/system/linkmesh-agent.service
# The upgrade watcher's unit and its open probation.
LM_UPGRADE_UNIT=linkmesh-upgrade.service
# The first-boot enrolment from /etc/linkmesh/enroll.env (images).
LM_ENROLL_UNIT=linkmesh-enroll.service
LM_PROBATION=$LM_STATE/upgrade/probation.json
# The collector runtime's unit, written by the agent.
LM_COLLECTOR_UNIT=linkmesh-collector.service
LM_COLLECTOR_UNIT_PATH=/etc/systemd/system/$LM_COLLECTOR_UNIT

lm_say() { printf 'linkmesh-agent: %s\n' "$*" >&2; }

lm_have_systemd() {
	[ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1
}

# Before the package's files are unpacked (deb preinst install|upgrade, rpm
# %pre): the server-first rule. The installed agent judges $LM_VERSION (the
# version of the package being installed) against the fleet server it is
# enrolled with, or the server version it last recorded; a refusal (exit 12)
# aborts the package manager before a file changes. LINKMESH_ALLOW_AHEAD=1
# in the package manager's environment overrides it (labs). A host with no
# agent installed has nothing to judge with: install.sh judged it already,
# or the host is not enrolled yet (the server refuses an agent ahead of it
# at enrolment).
lm_server_first() {
	# A rollback puts back a version the failed one judged already; the
	# installed (failed) binary is not asked anything.
	[ -z "${LINKMESH_ROLLBACK:-}" ] || return 0
	lm_agent=/usr/bin/linkmesh-agent
	if [ ! -x "$lm_agent" ]; then
		if [ -f "$LM_IDENTITY" ]; then
			lm_say "warning: no agent is installed to check linkmesh-agent $LM_VERSION against the fleet server (server first); installing it unchecked"
		fi
		return 0
	fi
	lm_rc=0
	"$lm_agent" server-first --to "$LM_VERSION" || lm_rc=$?
	case $lm_rc in
	0) ;;
	12)
		lm_say "not installing linkmesh-agent $LM_VERSION (see above); the installed agent and its identity are untouched"
		exit 1
		;;
	2) lm_say "warning: the installed agent predates the server-first check; installing linkmesh-agent $LM_VERSION unchecked" ;;
	*) lm_say "warning: the server-first check did not run (exit $lm_rc); installing linkmesh-agent $LM_VERSION unchecked" ;;
	esac
}

# Before the package's files are unpacked, after lm_server_first: the
# installed agent keeps itself (the watcher, and its package for a rollback)
# and opens the probation of $LM_VERSION. $1 is deb or rpm. Only on an
# enrolled systemd host with an agent installed; never for a rollback.
lm_keep_previous() {
	[ -z "${LINKMESH_ROLLBACK:-}" ] || return 0
	[ -x /usr/bin/linkmesh-agent ] && [ -f "$LM_IDENTITY" ] || return 0
	lm_have_systemd || return 0
	/usr/bin/linkmesh-agent upgrade keep --to "$LM_VERSION" --method "$1" ||
		lm_say "warning: could not open the upgrade probation; linkmesh-agent $LM_VERSION is installed unwatched"
}

# After the new agent was (re)started: the watcher takes the probation.
lm_watch() {
	lm_have_systemd || return 0
	systemctl enable --quiet "$LM_UPGRADE_UNIT" 2>/dev/null || true
	[ -z "${LINKMESH_ROLLBACK:-}" ] && [ -f "$LM_PROBATION" ] || return 0
	systemctl start --no-block "$LM_UPGRADE_UNIT" ||
		lm_say "could not start $LM_UPGRADE_UNIT: a failing upgrade will not be rolled back"
	lm_say "linkmesh-agent $LM_VERSION is on probation; a failing start is rolled back (linkmesh-agent upgrade status)"
}

# After the package's files are in place: fresh install, upgrade, downgrade,
# reinstall. $1 is the install method to record (deb or rpm).
lm_configure() {
	install -d -m 0700 "$LM_STATE"
	# What the agent reports as its install method, so the server can say
	# how to upgrade this host. Written whole, synced, renamed, dir synced.
	printf '%s\n' "$1" >"$LM_STATE/.install-method.new"
	sync "$LM_STATE/.install-method.new" 2>/dev/null || true
	mv -f "$LM_STATE/.install-method.new" "$LM_STATE/install-method"
	sync "$LM_STATE" 2>/dev/null || true

	if [ -f "$LM_SCRIPT_UNIT" ] && grep -q '^ExecStart=/usr/bin/linkmesh-agent run' "$LM_SCRIPT_UNIT"; then
		lm_say "removing $LM_SCRIPT_UNIT left by install.sh; the packaged unit replaces it"
		rm -f "$LM_SCRIPT_UNIT"
	fi

	lm_have_systemd || {
		lm_say "systemd is not running: start 'linkmesh-agent run' under your service manager"
		return 0
	}
	systemctl daemon-reload || true
	# The package keeps the unit enabled; to keep the agent off for good, use
	# `systemctl mask linkmesh-agent`, which survives upgrades.
	systemctl enable --quiet "$LM_UNIT" 2>/dev/null || lm_say "could not enable $LM_UNIT"
	systemctl enable --quiet "$LM_ENROLL_UNIT" 2>/dev/null || lm_say "could not enable $LM_ENROLL_UNIT"
	if [ -f "$LM_IDENTITY" ]; then
		# restart also starts a stopped unit: after an upgrade the new binary
		# runs; after a reinstall the agent is back.
		# The watcher first: its window is open while the new agent starts
		# (a start that never reaches READY blocks this restart for up to
		# the unit's TimeoutStartSec).
		lm_watch
		systemctl restart "$LM_UNIT" ||
			lm_say "$LM_UNIT did not start: see journalctl -u linkmesh-agent"
	else
		lm_say "this host is not enrolled; enrol it, then start the agent:"
		lm_say "  LINKMESH_TOKEN=... linkmesh-agent enroll --server https://SERVER --ca-pin sha256:HEX"
		lm_say "  systemctl start $LM_UNIT"
	fi
}

# Before the package's files go away for good (not on upgrade).
lm_stop() {
	lm_have_systemd || return 0
	# Removing the package ends an open probation: nothing is rolled back.
	if [ -z "${LINKMESH_ROLLBACK:-}" ]; then
		systemctl stop "$LM_UPGRADE_UNIT" 2>/dev/null || true
		rm -f "$LM_PROBATION"
	fi
	systemctl disable --quiet "$LM_UPGRADE_UNIT" 2>/dev/null || true
	systemctl disable --quiet "$LM_ENROLL_UNIT" 2>/dev/null || true
	systemctl stop "$LM_UNIT" 2>/dev/null || true
	systemctl disable --quiet "$LM_UNIT" 2>/dev/null || true
}

# After the files are gone.
lm_removed() {
	lm_have_systemd || return 0
	systemctl daemon-reload || true
}

# deb purge only: the collector runtime's unit, the identity, the
# supervisor's storage, the records.
lm_purge() {
	if [ -f "$LM_COLLECTOR_UNIT_PATH" ]; then
		if lm_have_systemd; then
			systemctl disable --now --quiet "$LM_COLLECTOR_UNIT" 2>/dev/null || true
		fi
		rm -f "$LM_COLLECTOR_UNIT_PATH"
		if lm_have_systemd; then
			systemctl daemon-reload || true
			systemctl reset-failed "$LM_COLLECTOR_UNIT" 2>/dev/null || true
		fi
		lm_say "stopped and removed $LM_COLLECTOR_UNIT (the collector runtime)"
	fi
	rm -rf "$LM_STATE"
	rm -rf /etc/linkmesh/agent.d
	rmdir /etc/linkmesh 2>/dev/null || true
	lm_say "purged $LM_STATE (identity and state) and /etc/linkmesh; the fleet server still lists this host until it is removed there"
}
