//! Logging: `tracing` to journald when systemd connected stderr to the journal
//! (`JOURNAL_STREAM` names stderr's device and inode), else to stderr. The
//! filter comes from `LINKMESH_LOG`, else the configured level.

use std::{io::IsTerminal as _, os::fd::AsFd};

use tracing_subscriber::{EnvFilter, layer::SubscriberExt, util::SubscriberInitExt};

/// Environment variable with `tracing` filter directives; overrides config.
pub const ENV_LOG: &str = "LINKMESH_LOG";

/// The filter directives for a configured level: a bare level applies to the
/// agent (other crates stay at `warn`); anything else is used as given.
pub fn filter_directives(env_value: Option<&str>, config_level: &str) -> String {
    let level = env_value
        .filter(|v| !v.trim().is_empty())
        .unwrap_or(config_level)
        .trim();
    match level {
        "trace" | "debug" | "info" | "warn" | "error" => format!("warn,linkmesh_agent={level}"),
        "off" => "off".to_owned(),
        other => other.to_owned(),
    }
}

/// Whether `JOURNAL_STREAM` (`<device>:<inode>`) names the file stderr is.
pub fn journal_stream_matches(journal_stream: &str, dev: u64, ino: u64) -> bool {
    journal_stream
        .split_once(':')
        .and_then(|(d, i)| Some((d.parse::<u64>().ok()?, i.parse::<u64>().ok()?)))
        .is_some_and(|(d, i)| d == dev && i == ino)
}

fn stderr_is_journal() -> bool {
    let Some(js) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(st) = nix::sys::stat::fstat(std::io::stderr().as_fd()) else {
        return false;
    };
    journal_stream_matches(&js.to_string_lossy(), st.st_dev, st.st_ino)
}

/// Installs the global subscriber. Call once, first thing.
pub fn init(config_level: &str) {
    let env_value = std::env::var(ENV_LOG).ok();
    let directives = filter_directives(env_value.as_deref(), config_level);
    let filter = EnvFilter::builder().parse(&directives).unwrap_or_else(|_| {
        EnvFilter::new(filter_directives(None, crate::config::DEFAULT_LOG_LEVEL))
    });
    if stderr_is_journal()
        && let Ok(journald) = tracing_journald::layer()
    {
        let _ = tracing_subscriber::registry()
            .with(filter)
            .with(journald.with_syslog_identifier("linkmesh-agent".to_owned()))
            .try_init();
        return;
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directives() {
        assert_eq!(filter_directives(None, "info"), "warn,linkmesh_agent=info");
        assert_eq!(
            filter_directives(Some("debug"), "info"),
            "warn,linkmesh_agent=debug"
        );
        assert_eq!(
            filter_directives(Some(" "), "error"),
            "warn,linkmesh_agent=error"
        );
        assert_eq!(
            filter_directives(None, "linkmesh_agent=trace,h2=info"),
            "linkmesh_agent=trace,h2=info"
        );
    }

    #[test]
    fn journal_stream() {
        assert!(journal_stream_matches("8:12345", 8, 12345));
        assert!(!journal_stream_matches("8:12345", 8, 1));
        assert!(!journal_stream_matches("garbage", 8, 12345));
    }
}
