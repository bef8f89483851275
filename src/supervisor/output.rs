//! A child's output, turned into log records: chunks split into lines with a
//! hard length bound (memory stays bounded whatever the child writes), bytes
//! decoded lossily, and the level and message taken from the supervisor's
//! zap JSON lines or console lines.

use std::borrow::Cow;

/// Longest line kept; the rest of a longer line is counted and dropped.
pub const MAX_LINE: usize = 16 * 1024;

/// Splits a byte stream into lines of at most [`MAX_LINE`] bytes.
#[derive(Debug, Default)]
pub struct LineSplitter {
    buf: Vec<u8>,
    /// Bytes dropped from the line being read.
    dropped: usize,
}

/// One line of output.
#[derive(Debug, PartialEq, Eq)]
pub struct Line {
    /// The kept bytes, without the newline.
    pub bytes: Vec<u8>,
    /// How many bytes of the line were dropped for length.
    pub truncated: usize,
}

impl LineSplitter {
    /// Feeds a chunk; returns the lines it completed.
    pub fn push(&mut self, mut chunk: &[u8]) -> Vec<Line> {
        let mut lines = Vec::new();
        while !chunk.is_empty() {
            match chunk.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    self.take(&chunk[..i]);
                    lines.push(self.finish());
                    chunk = &chunk[i + 1..];
                }
                None => {
                    self.take(chunk);
                    break;
                }
            }
        }
        lines
    }

    /// The last, unterminated line at end of stream.
    pub fn flush(&mut self) -> Option<Line> {
        (!self.buf.is_empty() || self.dropped > 0).then(|| self.finish())
    }

    fn take(&mut self, part: &[u8]) {
        let room = MAX_LINE.saturating_sub(self.buf.len());
        let keep = part.len().min(room);
        self.buf.extend_from_slice(&part[..keep]);
        self.dropped += part.len() - keep;
    }

    fn finish(&mut self) -> Line {
        let mut bytes = std::mem::take(&mut self.buf);
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
        let line = Line {
            bytes,
            truncated: self.dropped,
        };
        self.dropped = 0;
        line
    }
}

/// A level for a child's log record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// debug
    Debug,
    /// info
    Info,
    /// warn
    Warn,
    /// error, dpanic, panic, fatal
    Error,
}

/// A parsed record.
#[derive(Debug, PartialEq, Eq)]
pub struct Record<'a> {
    /// Its level.
    pub level: Level,
    /// The message.
    pub message: Cow<'a, str>,
    /// Other fields of a JSON line, as compact JSON, when there are any.
    pub fields: Option<String>,
    /// The line is the collector's own output, which the supervisor passes
    /// through (logger `supervisor.collector`).
    pub collector: bool,
    /// `service.name` and `service.version` of the collector's telemetry
    /// resource, when its line carries them: the version actually running.
    pub service: Option<(String, String)>,
}

/// The logger name under which opampsupervisor passes the collector's own
/// output through (`passthrough_logs: true`): stdout lines at info, stderr
/// lines at error, whatever the collector's own level was.
const COLLECTOR_LOGGER: &str = "supervisor.collector";

/// Parses a line: a zap JSON record (`{"level":"info","ts":…,"msg":"…"}`),
/// a zap console record (`2026-08-05T15:54:42.823Z\tDEBUG\tcaller\tmsg`),
/// or plain text at `default` level. A supervisor record that passes a
/// collector line through is unwrapped: the collector's line (JSON or
/// console) gives the level and message, and the record is marked as the
/// collector's.
pub fn parse_record(text: &str, default: Level) -> Record<'_> {
    let trimmed = text.trim();
    if trimmed.starts_with('{')
        && let Ok(serde_json::Value::Object(mut map)) =
            serde_json::from_str::<serde_json::Value>(trimmed)
    {
        let level = map
            .get("level")
            .and_then(|l| l.as_str())
            .map_or(default, |l| level_of(l).unwrap_or(default));
        let message = map.get("msg").and_then(|m| m.as_str()).map(str::to_owned);
        if let Some(message) = message {
            if map.get("logger").and_then(|l| l.as_str()) == Some(COLLECTOR_LOGGER) {
                let inner = parse_record(&message, level);
                return Record {
                    level: inner.level,
                    message: Cow::Owned(inner.message.into_owned()),
                    fields: inner.fields,
                    collector: true,
                    service: inner.service,
                };
            }
            for k in ["level", "msg", "ts"] {
                map.remove(k);
            }
            let service = service_of(map.get("resource"));
            let fields = (!map.is_empty()).then(|| serde_json::Value::Object(map).to_string());
            return Record {
                level,
                message: Cow::Owned(message),
                fields,
                collector: false,
                service,
            };
        }
    }
    // zap console: TS \t LEVEL \t CALLER \t MESSAGE [\t JSON fields]
    let tabbed: Vec<&str> = trimmed.splitn(5, '\t').collect();
    if let [ts, lvl, _caller, msg, rest @ ..] = tabbed.as_slice()
        && is_timestamp(ts)
        && let Some(level) = level_of(lvl)
    {
        let fields = rest.first().map(|f| f.trim().to_owned());
        let service = fields
            .as_deref()
            .and_then(|f| serde_json::from_str::<serde_json::Value>(f).ok())
            .and_then(|v| service_of(v.get("resource")));
        return Record {
            level,
            message: Cow::Borrowed(msg.trim()),
            fields,
            collector: false,
            service,
        };
    }
    let mut parts = trimmed.splitn(3, char::is_whitespace);
    if let (Some(ts), Some(lvl), Some(rest)) = (parts.next(), parts.next(), parts.next())
        && is_timestamp(ts)
        && let Some(level) = level_of(lvl)
    {
        return Record {
            level,
            message: Cow::Borrowed(rest.trim()),
            fields: None,
            collector: false,
            service: None,
        };
    }
    Record {
        level: default,
        message: Cow::Borrowed(text),
        fields: None,
        collector: false,
        service: None,
    }
}

fn is_timestamp(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_digit()) && s.contains('T')
}

/// `service.name` and `service.version` of a telemetry resource object.
fn service_of(resource: Option<&serde_json::Value>) -> Option<(String, String)> {
    let r = resource?;
    let get = |k: &str| r.get(k).and_then(|v| v.as_str()).map(str::to_owned);
    Some((get("service.name")?, get("service.version")?))
}

/// A line of the collector's output as it is kept for the server: at most
/// [`TAIL_LINE`] characters, control characters escaped, so it can be shown
/// anywhere without breaking a terminal or a JSON reader's eyes.
pub fn escape_for_report(line: &str) -> String {
    let mut out = String::with_capacity(line.len().min(TAIL_LINE));
    for (n, c) in line.chars().enumerate() {
        if n >= TAIL_LINE {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Longest collector line kept for a report, in characters.
pub const TAIL_LINE: usize = 512;

fn level_of(s: &str) -> Option<Level> {
    match s.to_ascii_lowercase().as_str() {
        "debug" => Some(Level::Debug),
        "info" => Some(Level::Info),
        "warn" | "warning" => Some(Level::Warn),
        "error" | "dpanic" | "panic" | "fatal" => Some(Level::Error),
        _ => None,
    }
}

/// What the supervisor's messages say about its collector.
#[derive(Debug, PartialEq, Eq)]
pub enum CollectorEvent {
    /// The collector started (with its pid when the message has one).
    Started(Option<u32>),
    /// The collector exited on its own.
    Crashed(Option<i32>),
    /// A new configuration failed the collector's validation and was not
    /// applied; the reason is the supervisor's error field.
    ConfigRejected(String),
    /// The supervisor finished bootstrapping: the collector it started to
    /// learn its description has exited, and the next one is the real one.
    Bootstrapped,
}

/// Recognises opampsupervisor's messages about its collector ("Agent
/// process started", "Agent process PID=%d exited unexpectedly, exit
/// code=%d. Will restart in a bit...").
pub fn collector_event(message: &str, fields: Option<&str>) -> Option<CollectorEvent> {
    let number_after = |hay: &str, key: &str| -> Option<i64> {
        let rest = &hay[hay.find(key)? + key.len()..];
        let end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '-'))
            .unwrap_or(rest.len());
        rest[..end].parse().ok()
    };
    if message.contains("exited unexpectedly") {
        let code = number_after(message, "exit code=")
            .or_else(|| fields.and_then(|f| number_after(f, "\"exit_code\":")))
            .and_then(|c| i32::try_from(c).ok());
        return Some(CollectorEvent::Crashed(code));
    }
    if message == "Supervisor starting" {
        return Some(CollectorEvent::Bootstrapped);
    }
    if message.starts_with("New configuration failed validation") {
        let reason = fields
            .and_then(|f| serde_json::from_str::<serde_json::Value>(f).ok())
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
            .unwrap_or_else(|| message.to_owned());
        return Some(CollectorEvent::ConfigRejected(reason));
    }
    if message.starts_with("Agent process started") {
        let pid = number_after(message, "PID=")
            .or_else(|| fields.and_then(|f| number_after(f, "\"pid\":")))
            .and_then(|p| u32::try_from(p).ok());
        return Some(CollectorEvent::Started(pid));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_lines_across_chunks() {
        let mut s = LineSplitter::default();
        assert_eq!(
            s.push(b"one\ntw"),
            vec![Line {
                bytes: b"one".to_vec(),
                truncated: 0
            }]
        );
        assert_eq!(
            s.push(b"o\r\nthree"),
            vec![Line {
                bytes: b"two".to_vec(),
                truncated: 0
            }]
        );
        assert_eq!(
            s.flush(),
            Some(Line {
                bytes: b"three".to_vec(),
                truncated: 0
            })
        );
        assert_eq!(s.flush(), None);
    }

    #[test]
    fn bounds_a_megabyte_line() {
        let mut s = LineSplitter::default();
        let big = vec![b'x'; 1 << 20];
        for chunk in big.chunks(8192) {
            assert!(s.push(chunk).is_empty());
        }
        let lines = s.push(b"\nnext\n");
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].bytes.len(), MAX_LINE);
        assert_eq!(lines[0].truncated, (1 << 20) - MAX_LINE);
        assert_eq!(
            lines[1],
            Line {
                bytes: b"next".to_vec(),
                truncated: 0
            }
        );
        assert!(s.buf.capacity() <= 2 * MAX_LINE);
    }

    #[test]
    fn records() {
        let r = parse_record(
            r#"{"level":"warn","ts":1754409282.82,"caller":"supervisor/supervisor.go:812","msg":"Setting health","healthy":false}"#,
            Level::Info,
        );
        assert_eq!(r.level, Level::Warn);
        assert_eq!(r.message, "Setting health");
        assert_eq!(
            r.fields.as_deref(),
            Some(r#"{"caller":"supervisor/supervisor.go:812","healthy":false}"#)
        );
        let r = parse_record(
            "2026-08-05T15:54:42.823Z\tDEBUG\tsupervisor/supervisor.go:2289\tSupervisor shutting down...",
            Level::Info,
        );
        assert_eq!(
            (r.level, r.message.as_ref()),
            (Level::Debug, "Supervisor shutting down...")
        );
        let r = parse_record(
            "2026/11/23 15:00:00 failed to load config: boom",
            Level::Warn,
        );
        assert_eq!(
            (r.level, r.message.as_ref()),
            (
                Level::Warn,
                "2026/11/23 15:00:00 failed to load config: boom"
            )
        );
        let r = parse_record(r#"{"level":"fatal","msg":"x"}"#, Level::Info);
        assert_eq!(r.level, Level::Error);
        let r = parse_record("{not json", Level::Info);
        assert_eq!(r.message, "{not json");
    }

    /// Lines as opampsupervisor v0.158.0 passes the collector's output
    /// through (recorded from the real binaries): stderr at "error" holding
    /// a console line, stdout at "info" holding a JSON line.
    #[test]
    fn collector_lines_passed_through_the_supervisor() {
        let console = r#"{"level":"error","ts":1796113731.5689762,"logger":"supervisor.collector","caller":"commander/commander.go:218","msg":"2026-12-01T08:28:51.568Z\tinfo\tservice@v0.158.0/service.go:259\tStarting otelcol-linkmesh...\t{\"resource\": {\"service.instance.id\": \"01a230b8\", \"service.name\": \"otelcol-linkmesh\", \"service.version\": \"0.158.0\"}, \"Version\": \"0.158.0\", \"NumCPU\": 2}","stacktrace":"github.com/..."}"#;
        let r = parse_record(console, Level::Info);
        assert!(r.collector);
        assert_eq!(
            (r.level, r.message.as_ref()),
            (Level::Info, "Starting otelcol-linkmesh...")
        );
        assert_eq!(
            r.service,
            Some(("otelcol-linkmesh".into(), "0.158.0".into()))
        );
        let json = r#"{"level":"info","ts":1796113768.79,"logger":"supervisor.collector","caller":"commander/commander.go:197","msg":"{\"level\":\"warn\",\"ts\":\"2026-12-01T08:29:28.790Z\",\"caller\":\"service@v0.158.0/service.go:334\",\"msg\":\"Shutdown complete.\",\"resource\":{\"service.name\":\"otelcol-linkmesh\",\"service.version\":\"0.158.0\"}}"}"#;
        let r = parse_record(json, Level::Info);
        assert!(r.collector);
        assert_eq!(
            (r.level, r.message.as_ref()),
            (Level::Warn, "Shutdown complete.")
        );
        assert_eq!(r.service.map(|s| s.1).as_deref(), Some("0.158.0"));
        let own = parse_record(
            r#"{"level":"info","logger":"supervisor","msg":"Supervisor starting"}"#,
            Level::Info,
        );
        assert!(!own.collector && own.service.is_none());
        assert_eq!(escape_for_report("a\tb\u{1b}[31m"), "a\\tb\\u{1b}[31m");
        assert_eq!(
            escape_for_report(&"x".repeat(600)).chars().count(),
            TAIL_LINE + 1
        );
    }

    #[test]
    fn collector_events() {
        assert_eq!(
            collector_event(
                "New configuration failed validation, keeping previous config. Note: ...",
                Some(
                    r#"{"error":"configuration validation failed: 'receivers' unknown type: \"nosuch\""}"#
                )
            ),
            Some(CollectorEvent::ConfigRejected(
                "configuration validation failed: 'receivers' unknown type: \"nosuch\"".into()
            ))
        );
        assert_eq!(
            collector_event("Supervisor starting", None),
            Some(CollectorEvent::Bootstrapped)
        );
        assert_eq!(
            collector_event(
                "Agent process exited unexpectedly. Will restart in a bit...",
                Some(r#"{"pid":7,"exit_code":-1}"#)
            ),
            Some(CollectorEvent::Crashed(Some(-1)))
        );
        assert_eq!(
            collector_event(
                "Agent process PID=4242 exited unexpectedly, exit code=2. Will restart in a bit...",
                None
            ),
            Some(CollectorEvent::Crashed(Some(2)))
        );
        assert_eq!(
            collector_event("Agent process started", Some(r#"{"pid":77}"#)),
            Some(CollectorEvent::Started(Some(77)))
        );
        assert_eq!(
            collector_event("Agent process started", None),
            Some(CollectorEvent::Started(None))
        );
        assert_eq!(collector_event("Starting agent", None), None);
    }
}
