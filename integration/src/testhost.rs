//! Throw-away hosts with real systemd: an overlay of this machine's root
//! (writes land in a scratch upper directory), fresh mount, PID, UTS, IPC
//! and network namespaces, and `/lib/systemd/systemd` as PID 1. A host boots
//! in seconds and leaves nothing behind: killing its PID 1 ends every process
//! in the PID namespace, the mounts go with the mount namespace, and the
//! scratch directory is then plain files.
//!
//! Files go in and out through `/proc/<pid1>/root`, the host's own view of
//! its filesystem; commands run through `nsenter`. Every wait is bounded. No
//! test touches this machine's own `/etc`, `/usr` or `/var`.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// How long systemd may take to reach `running`.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// Where hosts keep their scratch directories; a crashed run's leftovers are
/// removed by the next [`TestHost::boot`].
pub const SCRATCH_ROOT: &str = "/tmp/linkmesh-testhosts";

/// The script run inside the new namespaces: overlay, pseudo-filesystems,
/// pivot_root, then exec systemd. Arguments: merged, upper, work, log,
/// hostname, machine id.
const BOOT_SCRIPT: &str = r#"
set -eu
M=$1 U=$2 W=$3 LOG=$4 NAME=$5 MID=$6
exec >"$LOG" 2>&1
# Its own cgroup in every hierarchy before systemd starts. Without it the
# systemd of every host running at once would take the same cgroup as its
# root and share unit cgroups: one host stopping linkmesh-agent.service
# removes the cgroup another host's start is joining (219/CGROUP).
SCRATCH=$(dirname "$LOG")
CG=linkmesh-testhost-$(basename "$SCRATCH")
: >"$SCRATCH/cgroups"
while IFS=: read -r _ ctrl path; do
	case "$ctrl" in
	"") base=/sys/fs/cgroup; [ -f "$base/cgroup.controllers" ] || base=/sys/fs/cgroup/unified ;;
	name=*) base=/sys/fs/cgroup/${ctrl#name=} ;;
	*) base=/sys/fs/cgroup/$ctrl ;;
	esac
	parent=$base${path%/}
	[ -d "$parent" ] || continue
	dir=$parent/$CG
	mkdir -p "$dir" 2>/dev/null || continue
	printf '%s\n' "$dir" >>"$SCRATCH/cgroups"
	if [ "$ctrl" = cpuset ]; then
		cat "$parent/cpuset.cpus" >"$dir/cpuset.cpus" 2>/dev/null || true
		cat "$parent/cpuset.mems" >"$dir/cpuset.mems" 2>/dev/null || true
	fi
	echo 0 >"$dir/cgroup.procs" 2>/dev/null || echo "note: cannot join $dir"
done </proc/self/cgroup
mount --make-rprivate /
mount -t overlay overlay -o "lowerdir=/,upperdir=$U,workdir=$W" "$M"
mount -t proc proc "$M/proc"
mount --rbind /sys "$M/sys"
mount --rbind /dev "$M/dev"
mount -t tmpfs -o mode=755 tmpfs "$M/run"
mount -t tmpfs -o mode=1777 tmpfs "$M/tmp"
printf '%s\n' "$MID" > "$M/etc/machine-id"
printf '%s\n' "$NAME" > "$M/etc/hostname"
hostname "$NAME"
mkdir -p "$M/.oldroot"
cd "$M"
pivot_root . .oldroot
umount -l /.oldroot
exec env -i container=linkmesh-testhost TERM=dumb /lib/systemd/systemd --system --log-target=journal
"#;

/// A booted throw-away host.
pub struct TestHost {
    name: String,
    scratch: PathBuf,
    unshare: Option<Child>,
    pid1: u32,
    machine_id: String,
}

impl TestHost {
    /// Boots a host named `name` and waits until systemd says `running`
    /// (or `degraded`: some unit of this machine's image failed, which is
    /// not the test's business).
    ///
    /// # Errors
    /// When namespaces, mounts or systemd fail, naming what is missing.
    pub fn boot(name: &str) -> anyhow::Result<Self> {
        for tool in ["unshare", "nsenter", "mount"] {
            if which(tool).is_none() {
                bail!("{tool} is required for throw-away hosts (util-linux)");
            }
        }
        if !Path::new("/lib/systemd/systemd").is_file() {
            bail!("/lib/systemd/systemd is required for throw-away hosts");
        }
        if !nix::unistd::geteuid().is_root() {
            bail!("throw-away hosts need root (namespaces, mounts)");
        }
        reap_leftovers();
        let scratch = Path::new(SCRATCH_ROOT).join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&scratch);
        for d in ["upper", "work", "merged"] {
            std::fs::create_dir_all(scratch.join(d))?;
        }
        let machine_id = random_hex(16);
        let mut host = Self {
            name: name.to_owned(),
            scratch,
            unshare: None,
            pid1: 0,
            machine_id,
        };
        host.unshare = Some(host.spawn()?);
        host.pid1 = host.find_pid1()?;
        host.wait_running()?;
        Ok(host)
    }

    fn spawn(&self) -> anyhow::Result<Child> {
        let scratch = &self.scratch;
        Command::new("unshare")
            .args([
                "--pid",
                "--fork",
                "--mount",
                "--uts",
                "--ipc",
                "--net",
                "--kill-child=SIGKILL",
                "sh",
                "-c",
                BOOT_SCRIPT,
                "boot",
            ])
            .arg(scratch.join("merged"))
            .arg(scratch.join("upper"))
            .arg(scratch.join("work"))
            .arg(scratch.join("boot.log"))
            .arg(&self.name)
            .arg(&self.machine_id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot run unshare")
    }

    /// Power cut and boot: every process dies at once (SIGKILL to PID 1),
    /// then the same disk (the scratch upper directory) and machine id boot
    /// again. The host comes back with a fresh network namespace: attach it
    /// to a [`TestNet`] again if it needs one.
    ///
    /// # Errors
    /// When the host does not come back.
    pub fn reboot(&mut self) -> anyhow::Result<()> {
        self.power_off();
        remove_cgroups(&self.scratch);
        self.unshare = Some(self.spawn()?);
        self.pid1 = self.find_pid1()?;
        self.wait_running()
    }

    fn power_off(&mut self) {
        if self.pid1 != 0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid1 as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if let Some(mut c) = self.unshare.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        self.pid1 = 0;
    }

    /// PID 1 of the host's PID namespace, as this machine sees it: the child
    /// that `unshare --fork` made (found by parentage, never by name).
    fn find_pid1(&mut self) -> anyhow::Result<u32> {
        let parent = self.unshare.as_ref().map_or(0, Child::id);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let children =
                std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children"))
                    .unwrap_or_default();
            if let Some(pid) = children
                .split_whitespace()
                .next()
                .and_then(|p| p.parse().ok())
            {
                return Ok(pid);
            }
            if let Some(c) = self.unshare.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                bail!(
                    "the host died while booting ({status}): {}",
                    self.boot_log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        bail!("no PID 1 appeared for host {}", self.name)
    }

    fn wait_running(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Ok(out) = self.exec("systemctl is-system-running 2>/dev/null || true") {
                last = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                if last == "running" || last == "degraded" {
                    return Ok(());
                }
            }
            if let Some(c) = self.unshare.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                bail!(
                    "host {} died while booting ({status}); boot log:\n{}",
                    self.name,
                    self.boot_log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "host {} did not reach running within {BOOT_TIMEOUT:?} (last: {last:?}); boot log:\n{}",
            self.name,
            self.boot_log()
        )
    }

    /// Runs a shell command inside the host and returns its stdout; fails
    /// with the command, its stdout and its stderr unless it exits 0.
    ///
    /// # Errors
    /// When nsenter cannot be run or the command fails.
    pub fn sh(&self, script: &str) -> anyhow::Result<String> {
        let out = self.exec(script)?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        anyhow::ensure!(
            out.status.success(),
            "`{script}` failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(text)
    }

    /// Runs a shell command inside the host (all its namespaces).
    ///
    /// # Errors
    /// When nsenter cannot be run.
    pub fn exec(&self, script: &str) -> anyhow::Result<Output> {
        Ok(Command::new("nsenter")
            .args(["-t", &self.pid1.to_string(), "-a", "/bin/sh", "-c", script])
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .stdin(Stdio::null())
            .output()?)
    }

    /// Runs a shell command inside the host whatever it exits with: its
    /// exit code (-1 for a signal) and its stdout followed by its stderr.
    ///
    /// # Errors
    /// When nsenter cannot be run.
    pub fn run(&self, script: &str) -> anyhow::Result<(i32, String)> {
        let out = self.exec(script)?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        ))
    }

    /// This host's view of `path` (absolute, inside the host), from outside.
    pub fn path(&self, path: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{}", self.pid1, path))
    }

    /// Copies a file into the host, creating parent directories, with `mode`.
    ///
    /// # Errors
    /// When it cannot be written.
    pub fn copy_in(&self, src: &Path, dest: &str, mode: u32) -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt as _;
        let target = self.path(dest);
        if let Some(p) = target.parent() {
            std::fs::create_dir_all(p)?;
        }
        std::fs::copy(src, &target)
            .with_context(|| format!("copy {} into host as {dest}", src.display()))?;
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode))?;
        Ok(())
    }

    /// The journal of a unit (`journalctl -u UNIT`), or of everything.
    pub fn journal(&self, unit: Option<&str>, extra: &str) -> String {
        let cmd = match unit {
            Some(u) => format!("journalctl --no-pager -u {u} {extra}"),
            None => format!("journalctl --no-pager {extra}"),
        };
        self.exec(&cmd)
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// Waits up to `limit` until `ok` holds for a unit's journal (journald
    /// writes a line a moment after the unit logged it).
    ///
    /// # Errors
    /// On timeout, with the journal's last lines.
    pub fn wait_journal(
        &self,
        unit: &str,
        what: &str,
        limit: Duration,
        ok: impl Fn(&str) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + limit;
        while !ok(&self.journal(Some(unit), "")) {
            if std::time::Instant::now() >= deadline {
                bail!(
                    "no {what} in {unit}'s journal within {limit:?}:\n{}",
                    self.journal(Some(unit), "-n 30")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// The host's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// PID 1 of the host as this machine sees it.
    pub fn pid1(&self) -> u32 {
        self.pid1
    }

    /// `systemctl show UNIT -p …` as a map.
    ///
    /// # Errors
    /// When systemctl cannot be run or fails.
    pub fn unit_properties(
        &self,
        unit: &str,
        props: &[&str],
    ) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
        let args: String = props.iter().map(|p| format!(" -p {p}")).collect();
        let out = self.exec(&format!("systemctl show {unit}{args}"))?;
        if !out.status.success() {
            bail!(
                "systemctl show {unit}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect())
    }

    /// What systemd and the unit said about a failed start, for a test's
    /// failure message: status (with the failing step's exit code, e.g.
    /// 219/CGROUP), result, and the last journal lines.
    pub fn service_failure(&self, unit: &str) -> String {
        self.exec(&format!(
            "systemctl status --no-pager -l -n 0 {unit}; systemctl show -p Result -p ExecMainCode -p ExecMainStatus -p NRestarts {unit}; journalctl --no-pager -n 60 -o short-monotonic"
        ))
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
    }

    fn boot_log(&self) -> String {
        std::fs::read_to_string(self.scratch.join("boot.log"))
            .unwrap_or_default()
            .chars()
            .rev()
            .take(4000)
            .collect::<String>()
            .chars()
            .rev()
            .collect()
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        // SIGKILL to PID 1 ends every process of the namespace.
        self.power_off();
        remove_cgroups(&self.scratch);
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

/// How long a unit was down across its last restart, from the
/// [`TestHost::unit_properties`] `ActiveExitTimestampMonotonic` (stopping
/// began) and `ActiveEnterTimestampMonotonic` (active again: READY for a
/// notify unit).
pub fn restart_downtime(props: &std::collections::BTreeMap<String, String>) -> Duration {
    let n = |k: &str| {
        props
            .get(k)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Duration::from_micros(
        n("ActiveEnterTimestampMonotonic").saturating_sub(n("ActiveExitTimestampMonotonic")),
    )
}

/// Removes the cgroups a host's boot script made (listed in its scratch
/// directory), innermost first; the kernel refuses while a member is still
/// exiting, so each removal is retried for up to a second.
fn remove_cgroups(scratch: &Path) {
    fn remove_tree(dir: &Path, deadline: Instant) {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    remove_tree(&e.path(), deadline);
                }
            }
        }
        while std::fs::remove_dir(dir).is_err() && dir.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let list = std::fs::read_to_string(scratch.join("cgroups")).unwrap_or_default();
    for dir in list.lines().filter(|l| l.contains("/linkmesh-testhost-")) {
        remove_tree(Path::new(dir), Instant::now() + Duration::from_secs(1));
    }
}

/// Removes scratch directories of hosts whose owning process is gone.
fn reap_leftovers() {
    let Ok(entries) = std::fs::read_dir(SCRATCH_ROOT) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let owner: Option<u32> = name.rsplit('-').next().and_then(|p| p.parse().ok());
        if owner.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists()) {
            remove_cgroups(&e.path());
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
}

fn random_hex(bytes: usize) -> String {
    use ring::rand::SecureRandom as _;
    let mut b = vec![0u8; bytes];
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    linkmesh_agent::hex::encode(&b)
}

/// A network link for throw-away hosts: a namespace where the reference
/// server listens on 192.0.2.1 (TEST-NET-1, a documentation range), joined to
/// each host by a veth pair. Removed on drop; traffic never leaves this
/// machine's own namespaces.
pub struct TestNet {
    netns: String,
    id: String,
    hosts: u8,
}

/// The server's address on a [`TestNet`].
pub const SERVER_ADDR: &str = "192.0.2.1";

impl TestNet {
    /// Creates the server namespace.
    ///
    /// # Errors
    /// When `ip` fails.
    pub fn new() -> anyhow::Result<Self> {
        if which("ip").is_none() {
            bail!("ip (iproute2) is required for test networks");
        }
        let id = random_hex(3);
        let netns = format!("lmsrv{id}");
        run(&["ip", "netns", "add", &netns])?;
        let net = Self {
            netns,
            id,
            hosts: 0,
        };
        run(&["ip", "-n", &net.netns, "link", "set", "lo", "up"])?;
        // The server's address lives on the namespace's loopback, so the
        // server can listen before any host is attached; each host gets a
        // route over its own veth (ARP answers for any local address).
        run(&[
            "ip",
            "-n",
            &net.netns,
            "addr",
            "add",
            &format!("{SERVER_ADDR}/32"),
            "dev",
            "lo",
        ])?;
        Ok(net)
    }

    /// The server namespace's name (for `ip netns exec`).
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// Joins `host` to the network; returns its address (192.0.2.N).
    ///
    /// # Errors
    /// When `ip` fails.
    pub fn attach(&mut self, host: &TestHost) -> anyhow::Result<String> {
        self.hosts += 1;
        let n = self.hosts;
        let (srv_if, host_if) = (format!("lm{}s{n}", self.id), format!("lm{}h{n}", self.id));
        run(&[
            "ip", "link", "add", &srv_if, "type", "veth", "peer", "name", &host_if,
        ])?;
        run(&["ip", "link", "set", &srv_if, "netns", &self.netns])?;
        run(&[
            "ip",
            "link",
            "set",
            &host_if,
            "netns",
            &host.pid1().to_string(),
        ])?;
        let addr = format!("192.0.2.{}", n + 1);
        run(&["ip", "-n", &self.netns, "link", "set", &srv_if, "up"])?;
        run(&[
            "ip",
            "-n",
            &self.netns,
            "route",
            "add",
            &format!("{addr}/32"),
            "dev",
            &srv_if,
        ])?;
        let out = host.exec(&format!(
            "ip link set lo up && ip addr add {addr}/24 dev {host_if} && ip link set {host_if} up"
        ))?;
        if !out.status.success() {
            bail!(
                "configuring {host_if} in host {}: {}",
                host.name(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(addr)
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
    }
}

fn run(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(args[0]).args(&args[1..]).output()?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A scratch directory named after `name`, a [`TestNet`], and a reference
/// server in its namespace on [`SERVER_ADDR`]:8443 asking for a report
/// every second (`serve_args` after that): what hosts attached to the net
/// enrol with.
///
/// # Errors
/// When the namespace or the server cannot be made.
pub fn server_across_the_veth(
    name: &str,
    serve_args: &[&str],
) -> anyhow::Result<(tempfile::TempDir, TestNet, crate::harness::Fleet)> {
    let dir = crate::harness::scratch(name)?;
    let net = TestNet::new()?;
    let mut args = vec!["--report-interval", "1s"];
    args.extend_from_slice(serve_args);
    let fleet = crate::harness::Fleet::start_in_netns(
        &dir.path().join("fleet"),
        net.netns(),
        &format!("{SERVER_ADDR}:8443"),
        &args,
    )?;
    Ok((dir, net, fleet))
}
