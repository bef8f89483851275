//! The collector runtime's own systemd unit, as pure logic: the unit file
//! the agent renders, the `systemctl show` snapshot it reads back, and the
//! mapping from what systemd says to the agent's published [`State`].
//!
//! In unit mode opampsupervisor is not the agent's child: it runs in
//! `linkmesh-collector.service`, enabled for boot, so restarting, crashing,
//! upgrading or removing the agent leaves it (and the collector it runs)
//! alone. systemd restarts it (`Restart=always`, fixed `RestartSec=`: the
//! systemd 252 of Debian 12 has no `RestartSteps=`), stops retrying after
//! [`START_LIMIT_BURST`] starts within [`START_LIMIT_INTERVAL`] (the unit is
//! then `failed`), and stops it with SIGINT, the one signal it handles
//! before it has bootstrapped as after.

use std::{collections::BTreeMap, fmt::Write as _, path::PathBuf, time::Duration};

use super::{State, policy::RestartPolicy};
use crate::systemd::{ActiveState, LoadState, SubState, UnitFileState};

/// The unit's name.
pub const UNIT_NAME: &str = "linkmesh-collector.service";
/// Where the agent writes it: under `/etc`, so it belongs to no package and
/// a package removal leaves it (and the collector) in place; purge deletes it.
pub const UNIT_DIR: &str = "/etc/systemd/system";
/// The collector's own writable directory, under /var/lib.
pub const COLLECTOR_STATE: &str = "linkmesh-collector";
/// systemd's delay before each restart.
pub const RESTART_SEC: Duration = Duration::from_secs(2);
/// Starts allowed within [`START_LIMIT_INTERVAL`] before the unit fails.
pub const START_LIMIT_BURST: u32 = 10;
/// The window of [`START_LIMIT_BURST`].
pub const START_LIMIT_INTERVAL: Duration = Duration::from_secs(120);
/// systemd's bound on a stop (SIGINT, then SIGKILL to what is left). The
/// supervisor gives its collector 10 s.
pub const TIMEOUT_STOP: Duration = Duration::from_secs(30);

/// The properties read with `systemctl show -p`.
pub const SHOW_PROPERTIES: &[&str] = &[
    "LoadState",
    "ActiveState",
    "SubState",
    "Result",
    "MainPID",
    "ExecMainCode",
    "ExecMainStatus",
    "ExecMainStartTimestampMonotonic",
    "ExecMainExitTimestampMonotonic",
    "ExecMainStartTimestamp",
    "NRestarts",
    "InvocationID",
    "UnitFileState",
    "FragmentPath",
];

/// What the unit file is made from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnitInputs {
    /// The opampsupervisor executable.
    pub supervisor: PathBuf,
    /// Its rendered configuration.
    pub config: PathBuf,
    /// Its storage directory (written by the supervisor).
    pub storage_dir: PathBuf,
    /// The agent's executable and state directory, for the unit's start
    /// condition (`linkmesh-agent runtime may-start`): on a clone's first
    /// boot the collector waits for the agent to reset the copied OpAMP
    /// instance uid instead of connecting as the original's collector.
    pub agent: PathBuf,
    /// The agent's state directory.
    pub state_dir: PathBuf,
    /// Variables set for the supervisor (the agent's proxy, see
    /// [`crate::transport::proxy_environment`]).
    pub environment: Vec<(String, String)>,
}

/// The unit file.
///
/// The sandbox is what a collector can live with: it runs as root (its
/// receivers read other users' logs and every process's /proc), narrowed to
/// reading any file (`CAP_DAC_READ_SEARCH`) and binding low ports
/// (`CAP_NET_BIND_SERVICE`, for syslog or SNMP receivers); the file system
/// is read-only but for `/var/lib/linkmesh-collector` and the supervisor's
/// storage.
pub fn render_unit(i: &UnitInputs) -> String {
    let mut u = String::new();
    let p = |p: &PathBuf| systemd_escape_path(&p.display().to_string());
    let _ = writeln!(
        u,
        "# Written by linkmesh-agent; edits are overwritten. Removing the agent\n\
         # package leaves this unit and the collector running; purging it, or\n\
         # `linkmesh-agent runtime stop`, stops them.\n\
         [Unit]\n\
         Description=LinkMesh collector runtime (opampsupervisor and its OpenTelemetry collector)\n\
         Documentation=file:/usr/share/doc/linkmesh-agent/README.md\n\
         Wants=network-online.target\n\
         After=network-online.target\n\
         StartLimitIntervalSec={}\n\
         StartLimitBurst={START_LIMIT_BURST}\n\
         \n\
         [Service]\n\
         Type=exec\n\
         {}{}ExecStart={} --config {}\n\
         Restart=always\n\
         RestartSec={}\n\
         # opampsupervisor stops its collector on SIGINT and exits; SIGKILL\n\
         # goes to whatever is left when the stop times out.\n\
         KillSignal=SIGINT\n\
         KillMode=mixed\n\
         TimeoutStopSec={}\n\
         UMask=0077\n\
         CapabilityBoundingSet=CAP_DAC_READ_SEARCH CAP_NET_BIND_SERVICE\n\
         NoNewPrivileges=yes\n\
         # The collector writes only under /var/lib/linkmesh-collector (file\n\
         # exporters, file_storage, checkpoints) and the supervisor in its\n\
         # storage; a drop-in with ReadWritePaths= opens other paths.\n\
         ProtectSystem=strict\n\
         StateDirectory={COLLECTOR_STATE}\n\
         StateDirectoryMode=0700\n\
         ReadWritePaths={}\n\
         ProtectHome=read-only\n\
         PrivateTmp=yes\n\
         PrivateMounts=yes\n\
         PrivateDevices=yes\n\
         DevicePolicy=closed\n\
         ProtectKernelTunables=yes\n\
         ProtectKernelModules=yes\n\
         ProtectKernelLogs=yes\n\
         ProtectControlGroups=yes\n\
         ProtectClock=yes\n\
         ProtectHostname=yes\n\
         RestrictSUIDSGID=yes\n\
         RestrictRealtime=yes\n\
         RestrictNamespaces=yes\n\
         LockPersonality=yes\n\
         MemoryDenyWriteExecute=yes\n\
         RemoveIPC=yes\n\
         SystemCallArchitectures=native\n\
         SystemCallFilter=@system-service\n\
         SystemCallFilter=~@privileged\n\
         SystemCallErrorNumber=EPERM\n\
         RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK\n\
         # Left out: ProtectProc/ProcSubset (the host metrics and process\n\
         # scrapers read all of /proc), PrivateNetwork and IPAddressDeny (it\n\
         # receives and exports telemetry), ProtectHome=yes (log receivers).\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target",
        START_LIMIT_INTERVAL.as_secs(),
        start_condition(i),
        environment(i),
        p(&i.supervisor),
        p(&i.config),
        RESTART_SEC.as_secs(),
        TIMEOUT_STOP.as_secs(),
        p(&i.storage_dir),
    );
    u
}

/// The unit's start condition (lines ending in a newline). It matters only
/// when the unit starts, so it is left out of what decides whether a
/// running collector must restart ([`running_part`]): an agent upgrade that
/// adds or changes it never restarts the collector.
pub fn start_condition(i: &UnitInputs) -> String {
    let p = |p: &PathBuf| systemd_escape_path(&p.display().to_string());
    format!(
        "# Not on a clone until the agent has reset the OpAMP instance uid\n\
         # copied with the disk (exit 1: skipped, not failed; the agent then\n\
         # starts it). Without the agent installed it always starts.\n\
         ExecCondition=/bin/sh -c 'test ! -x \"$$0\" || exec \"$$0\" runtime may-start --state \"$$1\"' {} {}\n",
        p(&i.agent),
        p(&i.state_dir)
    )
}

/// `Environment=` lines, one per variable, quoted for systemd.
fn environment(i: &UnitInputs) -> String {
    let mut out = String::new();
    for (k, v) in &i.environment {
        let value = format!("{k}={v}")
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('%', "%%")
            .replace('$', "$$");
        let _ = writeln!(out, "Environment=\"{value}\"");
    }
    out
}

/// What of the unit file a running collector depends on: all of it but the
/// start condition.
pub fn running_part(i: &UnitInputs, unit_text: &str) -> String {
    unit_text.replacen(&start_condition(i), "", 1)
}

/// A path as one word of a unit file's command line or path list: spaces
/// and specifiers escaped so systemd reads it back unchanged.
pub fn systemd_escape_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        match c {
            '%' => out.push_str("%%"),
            '\\' => out.push_str("\\\\"),
            ' ' => out.push_str("\\x20"),
            '"' => out.push_str("\\x22"),
            '\'' => out.push_str("\\x27"),
            '$' => out.push_str("$$"),
            c if c.is_control() => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// What `systemctl show` says about the unit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// `LoadState`.
    pub load_state: LoadState,
    /// `ActiveState`.
    pub active_state: ActiveState,
    /// `SubState`.
    pub sub_state: SubState,
    /// `success`, `exit-code`, `signal`, `start-limit-hit`…
    pub result: String,
    /// The main process, 0 when none.
    pub main_pid: u32,
    /// How the main process last ended: 1 exited, 2 killed, 3 dumped core.
    pub exec_main_code: u32,
    /// Its exit code or signal number.
    pub exec_main_status: i32,
    /// When it started (monotonic µs), 0 if never.
    pub started_mono_us: u64,
    /// When it ended (monotonic µs), 0 if it has not.
    pub exited_mono_us: u64,
    /// When it started (Unix seconds), from `--timestamp=unix`.
    pub started_unix_s: Option<u64>,
    /// systemd's automatic restarts since the unit was last started on request.
    pub n_restarts: u32,
    /// This run of the unit.
    pub invocation_id: String,
    /// `UnitFileState`.
    pub unit_file_state: UnitFileState,
}

/// Reads `systemctl show --timestamp=unix -p …` output (`Key=value` lines).
pub fn parse_show(text: &str) -> Snapshot {
    let map: BTreeMap<&str, &str> = text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim(), v.trim()))
        .collect();
    let s = |k: &str| map.get(k).map(|v| (*v).to_owned()).unwrap_or_default();
    let n = |k: &str| map.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    Snapshot {
        load_state: LoadState::parse(&s("LoadState")),
        active_state: ActiveState::parse(&s("ActiveState")),
        sub_state: SubState::parse(&s("SubState")),
        result: s("Result"),
        main_pid: u32::try_from(n("MainPID")).unwrap_or(0),
        exec_main_code: u32::try_from(n("ExecMainCode")).unwrap_or(0),
        exec_main_status: map
            .get("ExecMainStatus")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        started_mono_us: n("ExecMainStartTimestampMonotonic"),
        exited_mono_us: n("ExecMainExitTimestampMonotonic"),
        started_unix_s: map
            .get("ExecMainStartTimestamp")
            .and_then(|v| v.strip_prefix('@'))
            .and_then(|v| v.parse().ok()),
        n_restarts: u32::try_from(n("NRestarts")).unwrap_or(u32::MAX),
        invocation_id: s("InvocationID"),
        unit_file_state: UnitFileState::parse(&s("UnitFileState")),
    }
}

impl Snapshot {
    /// The unit file is known to systemd.
    pub fn loaded(&self) -> bool {
        self.load_state == LoadState::Loaded
    }

    /// Running, or on its way to running.
    pub fn up(&self) -> bool {
        self.active_state.up()
    }

    /// How the main process last ended, when it has: `exit code 1`,
    /// `killed by SIGKILL`.
    pub fn last_exit(&self) -> Option<String> {
        if self.exited_mono_us == 0 || self.exited_mono_us < self.started_mono_us {
            return None;
        }
        let signal = |n: i32| {
            nix::sys::signal::Signal::try_from(n)
                .map(|s| s.as_str().to_owned())
                .unwrap_or_else(|_| format!("signal {n}"))
        };
        Some(match self.exec_main_code {
            1 => format!("exit code {}", self.exec_main_status),
            2 => format!("killed by {}", signal(self.exec_main_status)),
            3 => format!("dumped core on {}", signal(self.exec_main_status)),
            _ => format!("ended ({})", self.result),
        })
    }

    /// How long the last finished run lasted.
    pub fn last_run(&self) -> Option<Duration> {
        (self.exited_mono_us >= self.started_mono_us && self.started_mono_us > 0)
            .then(|| Duration::from_micros(self.exited_mono_us - self.started_mono_us))
    }
}

/// Counts short runs across snapshots, the way [`super::policy::Backoff`]
/// does for a child: each restart systemd made after a run shorter than
/// the policy's `stable_after` adds one; a long run resets the count.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShortRuns {
    seen_restarts: Option<u32>,
    consecutive: u32,
}

impl ShortRuns {
    /// Takes in a snapshot; returns the short runs in a row so far.
    pub fn observe(&mut self, s: &Snapshot, policy: &RestartPolicy, running_for: Duration) -> u32 {
        let before = self.seen_restarts.unwrap_or(s.n_restarts);
        if s.n_restarts < before {
            // Started again on request: systemd's count starts over.
            self.consecutive = 0;
        } else if s.n_restarts > before {
            let new = s.n_restarts - before;
            match s.last_run() {
                Some(ran) if ran >= policy.stable_after => self.consecutive = new,
                _ => self.consecutive = self.consecutive.saturating_add(new),
            }
        }
        if s.active_state == ActiveState::Active && running_for >= policy.stable_after {
            self.consecutive = 0;
        }
        self.seen_restarts = Some(s.n_restarts);
        self.consecutive
    }
}

/// The published state for a snapshot. `stopped_on_request` is the
/// operator's `linkmesh-agent runtime stop`; `consecutive` comes from
/// [`ShortRuns`].
pub fn state_of(
    s: &Snapshot,
    consecutive: u32,
    policy: &RestartPolicy,
    stopped_on_request: bool,
    now_unix_ms: u64,
) -> State {
    if !s.loaded() {
        return if stopped_on_request {
            State::Stopped
        } else {
            State::NotRunnable {
                error: format!(
                    "{UNIT_NAME} is not loaded ({}); the agent writes it when it starts",
                    s.load_state
                ),
            }
        };
    }
    match (&s.active_state, &s.sub_state) {
        (ActiveState::Active | ActiveState::Reloading, _) if s.main_pid != 0 => State::Running {
            pid: s.main_pid,
            since_unix_ms: s
                .started_unix_s
                .map_or(now_unix_ms, |t| t.saturating_mul(1000)),
        },
        (ActiveState::Activating, SubState::AutoRestart) => {
            let delay_ms = RESTART_SEC.as_millis() as u64;
            if consecutive >= policy.crash_loop_after {
                State::CrashLoop {
                    delay_ms,
                    consecutive_failures: consecutive,
                }
            } else {
                State::Backoff {
                    delay_ms,
                    consecutive_failures: consecutive,
                }
            }
        }
        (ActiveState::Failed, _) => State::Failed {
            reason: failure_reason(s),
        },
        (ActiveState::Inactive, _) if stopped_on_request => State::Stopped,
        _ => State::Starting,
    }
}

/// systemd's reason for a failed unit, with the last exit: `systemd gave up
/// (start-limit-hit) after exit code 1`.
pub fn failure_reason(s: &Snapshot) -> String {
    let result = if s.result.is_empty() {
        "unknown"
    } else {
        &s.result
    };
    // systemd 252 reports the run's own result (exit-code) also when the
    // start limit refused the next start; the restart count tells.
    let what = if result == "start-limit-hit" || s.n_restarts + 1 >= START_LIMIT_BURST {
        format!(
            "systemd stopped restarting it (start limit: {START_LIMIT_BURST} starts within {} s; result {result})",
            START_LIMIT_INTERVAL.as_secs()
        )
    } else {
        format!("systemd marked it failed ({result})")
    };
    match s.last_exit() {
        Some(exit) => format!("{UNIT_NAME} failed: {what}; its last run ended with {exit}"),
        None => format!("{UNIT_NAME} failed: {what}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> UnitInputs {
        UnitInputs {
            supervisor: "/usr/bin/opampsupervisor".into(),
            config: "/var/lib/linkmesh-agent/supervisor.yaml".into(),
            storage_dir: "/var/lib/linkmesh-agent/supervisor".into(),
            agent: "/usr/bin/linkmesh-agent".into(),
            state_dir: "/var/lib/linkmesh-agent".into(),
            environment: Vec::new(),
        }
    }

    #[test]
    fn golden() {
        let got = render_unit(&inputs());
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/src/supervisor/testdata/linkmesh-collector.golden.service"
        );
        if std::env::var_os("LINKMESH_UPDATE_GOLDEN").is_some() {
            std::fs::write(path, &got).unwrap();
        }
        let want = std::fs::read_to_string(path).unwrap_or_default();
        assert_eq!(
            got, want,
            "golden file differs; LINKMESH_UPDATE_GOLDEN=1 cargo test --lib unit rewrites it"
        );
    }

    #[test]
    fn the_proxy_goes_in_the_supervisors_environment() {
        let mut i = inputs();
        assert!(!render_unit(&i).contains("Environment="));
        i.environment = vec![("HTTPS_PROXY".into(), "http://proxy.corp:3128".into())];
        let u = render_unit(&i);
        assert!(
            u.contains("Environment=\"HTTPS_PROXY=http://proxy.corp:3128\"\nExecStart="),
            "{u}"
        );
    }

    #[test]
    fn the_start_condition_is_not_what_the_collector_runs() {
        let i = inputs();
        let text = render_unit(&i);
        assert!(text.contains(&start_condition(&i)), "{text}");
        let running = running_part(&i, &text);
        assert!(!running.contains("ExecCondition="), "{running}");
        assert!(running.contains("ExecStart=/usr/bin/opampsupervisor --config"));
        // What the agent before the start condition wrote: the same text
        // without it, so its recorded fingerprint still matches.
        assert_eq!(running.lines().count() + 4, text.lines().count());
    }

    #[test]
    fn paths_are_escaped_for_systemd() {
        let mut i = inputs();
        i.supervisor = "/opt/my otel/100%/sup$".into();
        let u = render_unit(&i);
        assert!(
            u.contains("ExecStart=/opt/my\\x20otel/100%%/sup$$ --config "),
            "{u}"
        );
        i.agent = "/opt/lm agent".into();
        let u = render_unit(&i);
        assert!(
            u.contains(
                "runtime may-start --state \"$$1\"' /opt/lm\\x20agent /var/lib/linkmesh-agent\n"
            ),
            "{u}"
        );
    }

    const RUNNING: &str = "LoadState=loaded\nActiveState=active\nSubState=running\nResult=success\nMainPID=4242\nExecMainCode=0\nExecMainStatus=0\nExecMainStartTimestampMonotonic=1000000\nExecMainExitTimestampMonotonic=0\nExecMainStartTimestamp=@1764583200\nNRestarts=0\nInvocationID=abc\nUnitFileState=enabled\n";

    #[test]
    fn a_running_unit() {
        let s = parse_show(RUNNING);
        assert_eq!(s.main_pid, 4242);
        assert_eq!(s.started_unix_s, Some(1_764_583_200));
        assert_eq!(s.last_exit(), None);
        assert!(s.up() && s.loaded());
        let p = RestartPolicy::default();
        assert_eq!(
            state_of(&s, 0, &p, false, 7),
            State::Running {
                pid: 4242,
                since_unix_ms: 1_764_583_200_000
            }
        );
    }

    #[test]
    fn restarts_back_off_then_loop_then_fail_with_systemds_reason() {
        let p = RestartPolicy::default();
        let mut runs = ShortRuns::default();
        let restarting = |n: u32| {
            parse_show(&format!(
                "LoadState=loaded\nActiveState=activating\nSubState=auto-restart\nResult=exit-code\nMainPID=0\nExecMainCode=1\nExecMainStatus=1\nExecMainStartTimestampMonotonic={}\nExecMainExitTimestampMonotonic={}\nNRestarts={n}\nInvocationID=i{n}\n",
                1_000_000 * u64::from(n),
                1_000_000 * u64::from(n) + 300_000
            ))
        };
        assert_eq!(runs.observe(&restarting(0), &p, Duration::ZERO), 0);
        let c = runs.observe(&restarting(1), &p, Duration::ZERO);
        assert_eq!(c, 1);
        assert_eq!(
            state_of(&restarting(1), c, &p, false, 0),
            State::Backoff {
                delay_ms: 2000,
                consecutive_failures: 1
            }
        );
        // Restarts missed between two snapshots are all counted.
        let c = runs.observe(&restarting(5), &p, Duration::ZERO);
        assert_eq!(c, 5);
        assert!(matches!(
            state_of(&restarting(5), c, &p, false, 0),
            State::CrashLoop {
                consecutive_failures: 5,
                ..
            }
        ));
        let failed = parse_show(
            "LoadState=loaded\nActiveState=failed\nSubState=failed\nResult=start-limit-hit\nExecMainCode=1\nExecMainStatus=1\nExecMainStartTimestampMonotonic=5\nExecMainExitTimestampMonotonic=9\n",
        );
        let State::Failed { reason } = state_of(&failed, 10, &p, false, 0) else {
            panic!("not failed");
        };
        assert!(reason.contains("start limit"), "{reason}");
        assert!(reason.contains("exit code 1"), "{reason}");
        let mut by_count = failed.clone();
        by_count.result = "exit-code".into();
        by_count.n_restarts = 9;
        assert!(failure_reason(&by_count).contains("start limit"));
        by_count.n_restarts = 2;
        assert!(failure_reason(&by_count).contains("marked it failed (exit-code)"));
    }

    #[test]
    fn a_long_run_or_a_requested_start_resets_the_count() {
        let p = RestartPolicy::default();
        let mut runs = ShortRuns::default();
        let mut s = parse_show(RUNNING);
        s.n_restarts = 3;
        runs.observe(&s, &p, Duration::ZERO);
        // It crashed after two minutes of running: one short run in a row.
        s.n_restarts = 4;
        s.started_mono_us = 1_000_000;
        s.exited_mono_us = 121_000_000;
        assert_eq!(runs.observe(&s, &p, Duration::ZERO), 1);
        s.exited_mono_us = 1_500_000;
        s.n_restarts = 6;
        assert_eq!(runs.observe(&s, &p, Duration::ZERO), 3);
        assert_eq!(runs.observe(&s, &p, Duration::from_secs(61)), 0);
        s.n_restarts = 0;
        assert_eq!(runs.observe(&s, &p, Duration::ZERO), 0);
    }

    #[test]
    fn killed_and_stopped_and_missing() {
        let p = RestartPolicy::default();
        let killed = parse_show(
            "LoadState=loaded\nActiveState=activating\nSubState=auto-restart\nExecMainCode=2\nExecMainStatus=9\nExecMainStartTimestampMonotonic=5\nExecMainExitTimestampMonotonic=9\n",
        );
        assert_eq!(killed.last_exit().as_deref(), Some("killed by SIGKILL"));
        let stopped = parse_show("LoadState=loaded\nActiveState=inactive\nSubState=dead\n");
        assert_eq!(state_of(&stopped, 0, &p, true, 0), State::Stopped);
        assert_eq!(state_of(&stopped, 0, &p, false, 0), State::Starting);
        let missing = parse_show("LoadState=not-found\nActiveState=inactive\n");
        assert!(matches!(
            state_of(&missing, 0, &p, false, 0),
            State::NotRunnable { .. }
        ));
        assert_eq!(state_of(&missing, 0, &p, true, 0), State::Stopped);
    }
}
